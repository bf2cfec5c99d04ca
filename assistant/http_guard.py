"""HTTP: what every request and response goes through, in front of all of Gradio's routes.

- ``HttpGuard`` (pure ASGI): a body cap (413), Gradio's upload routes shut unless a component
  takes files (``UploadPolicy``, ``takes_uploads``; 403), its fetch-any-URL route refused,
  and the Content-Security-Policy (``CSP``) on every response;
- ``LINKS_HEAD``: off-site links get ``rel="noopener noreferrer nofollow"``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import gradio as gr


@dataclass(frozen=True)
class UploadPolicy:
    """Gradio's upload route (``/gradio_api/upload``, and ``/gradio_api/process_recording``)
    takes files from anyone who can reach the page, up to 1000 files a request, although no
    component of this app takes a file: left open it lets anyone fill the server's disk.
    ``open`` None (the default): the routes answer 403 unless a component of the app takes
    files (``takes_uploads``); True opens them, False keeps them shut.  When open, a file
    has at most ``max_file_bytes`` and a request's body at most ``request_bytes`` (one such
    file and its framing).  Gradio also keeps files it serves (the console's exports) in its
    cache, so they are deleted once ``max_age_s`` old."""
    max_file_bytes: int = 1024 * 1024
    clean_every_s: int = 3600
    max_age_s: int = 3600
    open: bool | None = None

    @property
    def delete_cache(self) -> tuple[int, int]:
        return (self.clean_every_s, self.max_age_s)

    @property
    def request_bytes(self) -> int:
        """The body cap of an upload request: one file and its multipart framing."""
        return self.max_file_bytes + 64 * 1024


UPLOADS = UploadPolicy()

# Components that send files to the upload route when a user may change them.
_FILE_INPUTS = tuple(c for c in (getattr(gr, n, None) for n in (
    "File", "UploadButton", "Image", "ImageEditor", "Sketchpad", "Paint", "ImageMask", "Audio", "Video",
    "Gallery", "Model3D", "MultimodalTextbox", "ImageSlider", "Files")) if isinstance(c, type))


def takes_uploads(demo: gr.Blocks) -> bool:
    """Whether a component of the app (any page) takes files from the user: an upload-capable
    component that is interactive, or left to Gradio to decide and an event's input."""
    inputs = {getattr(block, "_id", None) for fn in demo.fns.values() for block in fn.inputs}
    for block in demo.blocks.values():
        if isinstance(block, _FILE_INPUTS):
            interactive = getattr(block, "interactive", None)
            if interactive or (interactive is None and block._id in inputs):
                return True
    return False


# The Content-Security-Policy of every page: images and media from this origin only (or inline
# data:/blob:), no plugins, no <base> elsewhere, forms post here, framed only by this origin.
# Scripts, styles and fonts are left as Gradio needs them (its theme loads web fonts).
CSP = ("img-src 'self' data: blob:; media-src 'self' data: blob:; object-src 'none'; base-uri 'self'; "
       "form-action 'self'; frame-ancestors 'self'")

# Links that leave the site open in a new tab, tell the other site nothing of this page and
# pass it no ranking: Gradio's Markdown sets target=_blank and rel="noopener noreferrer" on
# links, this script adds nofollow (to raw <a> tags in a message too) as they appear.
LINKS_HEAD = """<script>
(() => {
  const REL = "noopener noreferrer nofollow";
  const mark = (a) => {
    let url;
    try { url = new URL(a.getAttribute("href") || "", location.href); } catch (e) { return; }
    if (url.origin === location.origin || !/^(https?|ftp):$/.test(url.protocol)) return;
    if (a.getAttribute("rel") !== REL) a.setAttribute("rel", REL);
    if (a.getAttribute("target") !== "_blank") a.setAttribute("target", "_blank");
  };
  const scan = (node) => {
    if (node.nodeType !== 1) return;
    if (node.matches("a[href]")) mark(node);
    node.querySelectorAll("a[href]").forEach(mark);
  };
  new MutationObserver((records) => records.forEach((r) => {
    if (r.type === "attributes") scan(r.target); else r.addedNodes.forEach(scan);
  })).observe(document.documentElement, {childList: true, subtree: true, attributes: true,
                                         attributeFilter: ["href", "rel", "target"]});
})();
</script>"""


class HttpGuard:
    """Pure ASGI middleware in front of all of Gradio's routes:

    - a request body over ``max_body_bytes`` is refused with 413 before the app reads it:
      at once by its Content-Length, or, sent chunked, once that many bytes have come (the
      middleware reads such a body itself, never more than the limit, and hands it on);
    - the upload routes answer 403 unless ``uploads_open`` (then their cap is ``upload_bytes``);
    - ``/gradio_api/file=<URL>`` answers 403: Gradio would fetch any public URL for the
      caller (a same-origin image that carries data elsewhere); this app serves only files;
    - every response carries ``CSP``."""

    UPLOAD_PATHS = ("/gradio_api/upload", "/gradio_api/process_recording")

    def __init__(self, app, max_body_bytes: int, uploads_open: bool, upload_bytes: int, csp: str = CSP):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.uploads_open = uploads_open
        self.upload_bytes = upload_bytes
        self.csp = csp.encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._with_policy(send)
        path = scope.get("path", "").rstrip("/")
        upload = path.endswith(self.UPLOAD_PATHS)
        if upload and not self.uploads_open:
            return await _json_error(send, 403, "this app takes no file uploads")
        if re.search(r"/file[=/]\s*(?:https?:|//)", path, re.IGNORECASE):
            return await _json_error(send, 403, "this app serves its own files only, not other sites'")
        limit = self.upload_bytes if upload else self.max_body_bytes
        if limit <= 0:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _json_error(send, 400, "malformed Content-Length")
            if declared > limit:
                return await _too_large(send, limit)
            return await self.app(scope, receive, send)  # the server reads no more than it declares
        if b"transfer-encoding" in headers:
            body = await _read_at_most(receive, limit)
            if body is None:
                return await _too_large(send, limit)
            return await self.app(scope, _replay(body, receive), send)
        return await self.app(scope, receive, send)

    def _with_policy(self, send):
        async def sending(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-security-policy"]
                message = {**message, "headers": [*headers, (b"content-security-policy", self.csp)]}
            await send(message)
        return sending


async def _json_error(send, status: int, error: str, **more) -> None:
    body = json.dumps({"error": error, **more}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def _too_large(send, limit: int) -> None:
    await _json_error(send, 413, f"request body too large: at most {limit} bytes", limit_bytes=limit)


async def _read_at_most(receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` bytes (or the client leaves)."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive):
    """A ``receive`` that gives the body already read, then whatever the client sends next
    (a disconnect)."""
    sent = False

    async def replaying():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replaying
