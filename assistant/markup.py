"""No images from other sites in what the page renders.

A Markdown image or an <img> in a message (the user's or the model's answer) makes every
browser that shows it fetch the URL, so a prompt-injected answer could carry the chat off in
it (Markdown-image exfiltration).  What the Chatbot and the comparison's answer panels receive
(and so what the API returns) keeps only images of the app's own origin (relative URLs) and
data:/blob: ones; any other image becomes "[image: its alt text]", while the store keeps the
text as it was written.  The page's Content-Security-Policy (``CSP``) stops other sites'
images as well.  The check over-approximates: a construct that may be an image is stripped
even inside code, with brackets read the ways CommonMark and Gradio's Markdown (marked) read
them, and every "<" that could open a tag read as a browser's tokenizer reads it.
"""

from __future__ import annotations

import bisect
import functools
import html
import re

_HTML_SPACE = "\t\n\f\r "
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*:")
_FETCH_ROUTE = re.compile(r"(?:file|proxy)[=/]\s*(?:[a-z][a-z0-9+.\-]*:|//)")  # Gradio's routes that fetch URLs
_CSS_FETCH = re.compile(r"url\s*\(|image-set|image\s*\(|cross-fade|src\s*\(|@import|\\", re.IGNORECASE)
_TAG = re.compile(r"<([a-zA-Z][^\t\n\f\r />]*)")
_ATTR = re.compile(r"[\t\n\f\r /]*(?:(>)|([^\t\n\f\r />][^\t\n\f\r />=]*)[\t\n\f\r ]*"
                   r"(?:=[\t\n\f\r ]*(?:\"([^\"]*)\"|'([^']*)'|([^\t\n\f\r >]*)))?)")
_MD_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_MD_DEFINITION = re.compile(r"\[((?:\\.|[^\[\]\\]){1,999})\]:[ \t]*(?:\n[ \t>]*)?(<[^>\n]*>|\S+)")
_NOT_ALT = re.compile(r"[!\[\]()<>\"'`\\*_~|]")
_C0_AND_SPACE = "".join(map(chr, range(0x21)))


def is_local_url(url: str) -> bool:
    """Whether an (unescaped) image URL stays on the app's own origin: a relative URL, or a
    data:/blob: one.  Read the way a browser does: tabs and newlines dropped, C0 controls and
    spaces trimmed, backslashes as slashes (``/\\host`` is ``//host``); Gradio's routes that
    fetch a URL given to them (``/gradio_api/file=https://...``) count as other sites."""
    u = re.sub(r"[\t\n\r]", "", url).strip(_C0_AND_SPACE).replace("\\", "/").lower()
    if u.startswith(("data:", "blob:")):
        return True
    if u.startswith("//") or _SCHEME.match(u):
        return False
    return not _FETCH_ROUTE.search(u)


def _image_marker(alt: str) -> str:
    words = " ".join(_NOT_ALT.sub("", alt).split())[:80]
    return f"[image: {words}]" if words else "[image]"


def _backtick_runs(text: str) -> dict[int, int]:
    """Start of each run of backticks -> its length."""
    return {m.start(): len(m.group()) for m in re.finditer(r"`+", text)}


def _closing_brackets(text: str, escapes: bool, code: str | None) -> dict[int, int]:
    """Each "[" -> the "]" that closes it, read one way: backslash escapes honoured or not;
    code spans skipped as CommonMark reads them ("exact": a run of n backticks closes at the
    next run of n), as marked reads link text ("single": backtick to backtick), or not at all."""
    close: dict[int, int] = {}
    stack: list[int] = []
    runs = _backtick_runs(text) if code else {}
    by_length: dict[int, list[int]] = {}
    for start, length in runs.items():
        by_length.setdefault(length, []).append(start)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and escapes:
            i += 2
            continue
        if c == "`" and code:
            length = runs.get(i, 1)
            if code == "single":
                end = text.find("`", i + 1)
                i = end + 1 if end >= 0 else i + 1
                continue
            starts = by_length.get(length, [])
            k = bisect.bisect_right(starts, i)
            i = starts[k] + length if k < len(starts) else i + length
            continue
        if c == "[":
            stack.append(i)
        elif c == "]" and stack:
            close[stack.pop()] = i
        i += 1
    return close


def _md_destination(text: str, k: int) -> tuple[str, int]:
    """An inline link's destination from ``k`` (just after its "("), unescaped, and where
    the construct ends (after its ")", or after the destination when there is none)."""
    n = len(text)
    while k < n and text[k] in _HTML_SPACE:
        k += 1
    if k < n and text[k] == "<":
        end = text.find(">", k + 1)
        dest, k = (text[k + 1:end], end + 1) if end >= 0 else (text[k + 1:], n)
    else:
        depth, j = 0, k
        while j < n:
            c = text[j]
            if c == "\\" and j + 1 < n:
                j += 2
                continue
            if c in _HTML_SPACE or ord(c) < 0x20 or (c == ")" and depth == 0):
                break
            depth += (c == "(") - (c == ")")
            j += 1
        dest, k = text[k:j], j
    close = text.find(")", k)
    return html.unescape(_MD_ESCAPE.sub(r"\1", dest)), (close + 1 if close >= 0 else k)


def _label(text: str) -> str:
    return " ".join(_MD_ESCAPE.sub(r"\1", text).split()).casefold()


def _strip_markdown_images(text: str) -> str:
    """Inline images ``![alt](url "title")`` and reference ones (``![alt][ref]``, ``![alt][]``,
    ``![alt]`` with a ``[ref]: url`` definition) whose URL is not local -> "[image: alt]"."""
    if "![" not in text:
        return text
    remote_refs = {_label(m.group(1)) for m in _MD_DEFINITION.finditer(text)
                   if not is_local_url(html.unescape(_MD_ESCAPE.sub(r"\1", m.group(2).strip("<>"))))}
    readings = [_closing_brackets(text, escapes, code) for escapes in (True, False) for code in ("exact", "single", None)]
    spans: dict[int, tuple[int, str]] = {}  # start -> (end, alt)
    for m in re.finditer(r"!\[", text):
        start = m.start()
        for close in readings:
            j = close.get(start + 1)
            if j is None:
                continue
            alt, after = text[start + 2:j], j + 1
            if text.startswith("(", after):
                dest, end = _md_destination(text, after + 1)
                remote = not is_local_url(dest)
            else:
                label, end = alt, after
                if text.startswith("[", after):
                    stop = text.find("]", after + 1)
                    if stop >= 0:
                        label, end = (text[after + 1:stop] or alt), stop + 1
                remote = _label(label) in remote_refs or _label(alt) in remote_refs
            if remote and end > spans.get(start, (start, ""))[0]:
                spans[start] = (end, alt)
    if not spans:
        return text
    out, at = [], 0
    for start in sorted(spans):
        end, alt = spans[start]
        if start < at:  # inside an image already stripped (nested in its alt text): stripped with it
            continue
        out += [text[at:start], _image_marker(alt)]
        at = end
    out.append(text[at:])
    return "".join(out)


def _attribute_fetches(key: str, value: str) -> tuple[bool, bool, bool]:
    """What one attribute would fetch from another site: (by src, by href, by anything else);
    whether src and href count depends on the tag (``_fetching_tags``)."""
    if key in ("src", "lowsrc", "dynsrc"):
        return not is_local_url(value), False, False
    if key in ("href", "xlink:href"):
        return False, not is_local_url(value), False
    if key in ("srcset", "imagesrcset"):
        return False, False, any(not is_local_url(part) for part in re.split(r"[\s,]+", value) if part)
    if key in ("poster", "background", "data"):
        return False, False, not is_local_url(value)
    return False, False, key == "style" and bool(_CSS_FETCH.search(value))


def _fetching_tags(text: str) -> list[tuple[int, int]]:
    """(start, end) of every start tag that would fetch an image or media from another site.
    Wherever "<" and a letter could begin a tag (inside comments, code and other tags' values
    too, as Gradio's Markdown may read them), its attributes are read as a browser's HTML
    tokenizer does; a tag that never ends is dropped by the browser.  Attribute runs are
    memoised by position, as tags that start inside others share their tails (linear time)."""
    memo: dict[int, tuple[int | None, bool, bool, bool]] = {}  # position -> (tag end, src, href, other)

    def rest_of_tag(i: int) -> tuple[int | None, bool, bool, bool]:
        chain = []
        while True:
            if i in memo:
                result = memo[i]
                break
            m = _ATTR.match(text, i)
            if m is None or m.end() == i:
                result = (None, False, False, False)
                break
            if m.group(1):
                result = (m.end(), False, False, False)
                break
            value = next((v for v in m.group(3, 4, 5) if v is not None), "")
            chain.append((i, _attribute_fetches(m.group(2).lower(), html.unescape(value))))
            i = m.end()
        for pos, (src, href, other) in reversed(chain):
            result = (result[0], result[1] or src, result[2] or href, result[3] or other)
            memo[pos] = result
        return result

    found = []
    for m in _TAG.finditer(text):
        end, src, href, other = rest_of_tag(m.end())
        name = m.group(1).lower()
        # frames: the page's sanitiser drops them; a link is followed only on a click
        if end is not None and (other or (src and name not in ("iframe", "frame")) or
                                (href and name not in ("a", "area"))):
            found.append((m.start(), end))
    return found


def _strip_html_images(text: str) -> str:
    """Every start tag that would fetch an image or media from another site -> "[image]"."""
    if "<" not in text:
        return text
    spans = _fetching_tags(text)
    if not spans:
        return text
    out, at = [], 0
    for start, end in spans:
        if end <= at:
            continue
        out += [text[at:max(at, start)], "[image]"]
        at = end
    out.append(text[at:])
    return "".join(out)


def no_remote_images(text: str) -> str:
    """``text`` with every image that would be fetched from another site replaced by a marker
    (see above); text without "![" or "<" is returned at once."""
    return _no_remote_images(text) if ("![" in text or "<" in text) else text


@functools.lru_cache(maxsize=512)  # the history is postprocessed again with every streamed token
def _no_remote_images(text: str) -> str:
    """Repeated until nothing changes: stripping one construct may join the text around it
    into another.  Each round removes a "!" or a "<", so it ends.  Then a CommonMark parser
    (markdown-it, a reading independent of the one above) checks the result: should it still
    find an image from elsewhere, every image opener is escaped ("!\\["), and should it find a
    fetching tag, every "<" is ("&lt;"), so nothing is fetched whatever the heuristics missed."""
    while True:
        cleaned = _strip_html_images(_strip_markdown_images(text))
        if cleaned == text:
            break
        text = cleaned
    images, tags = _remote_by_commonmark(text)
    if images:
        text = text.replace("![", "!\\[")
    if tags:
        text = text.replace("<", "&lt;")
    return text


def _remote_by_commonmark(text: str) -> tuple[bool, bool]:
    """Whether markdown-it's CommonMark reading of ``text`` has an image from another site,
    and whether its raw HTML has a tag that fetches from one."""
    from markdown_it import MarkdownIt

    images = tags = False
    for token in MarkdownIt("commonmark").parse(text):
        if token.type in ("html_block", "html_inline"):
            tags = tags or bool(_fetching_tags(token.content))
        for child in token.children or []:
            if child.type == "image" and not is_local_url(child.attrGet("src") or ""):
                images = True
            elif child.type == "html_inline":
                tags = tags or bool(_fetching_tags(child.content))
    return images, tags
