"""HTTP hardening, round two, against a real Gradio server and a real SQLite file: no remote
images reach the page (the store keeps the text as written), a Content-Security-Policy on
every page, a request-body cap in front of Gradio's routes (Content-Length and chunked),
the upload route shut, X-Forwarded-For ignored unless a proxy is configured, and a cap on
the chats one browser keeps.  The page itself under the policy: test_hardening_http_browser.py."""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import gradio as gr
import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assistant import http_guard, markup
from assistant.client import message_text as text_of
from assistant.safe_components import SafeChatbot, SafeMarkdown
from assistant.settings import Settings, from_namespace, parse
from feedback.store import FeedbackStore, TooManyChats, owner_hash
from tests.factories import PASSWORD, RawConsole, app_settings, launch_app

SAMPLING = (0.7, 0.9, 8, -1)
EVIL = "evil.example"
IMAGES = (f"Look ![a cat](https://{EVIL}/cat.png?q=secret \"title\") and <img src=http://{EVIL}/a.png alt=x> "
          f"and <IMG/SRC=\"&#104;ttps://{EVIL}/b.png\"> but ![ok](data:image/png;base64,iVBORw0KGgo=) "
          f"and ![ref][r] stay [a link](https://example.org/page)\n\n[r]: //{EVIL}/ref.png")


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    """Default settings but a small chat cap (its test's client keeps its own chats; every
    other test uses fresh clients, each with a key of its own)."""
    settings = app_settings(tmp_path_factory.mktemp("hardening"), tiny_model_dir, admin_password=PASSWORD,
                            max_chats_per_browser=2)
    url, ctx, close = launch_app(settings)
    yield url.rstrip("/"), ctx
    close()


def chat(client: Client, message: str):
    return client.predict(message, "", *SAMPLING, api_name="/chat")


def conversation_of(store, message: str) -> dict:
    rows = store.query("SELECT c.* FROM conversations c JOIN messages m ON m.conversation_id = c.id "
                       "WHERE m.role = 'user' AND m.content = ?", (message,))
    assert len(rows) == 1, rows
    return rows[0]


class Fetches(HTMLParser):
    """The URLs an HTML page would fetch for images and media (and every tag's style)."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "srcset", "poster", "background", "data", "style", "xlink:href") or (
                    key == "href" and tag not in ("a", "area")):
                self.urls.append(value or "")

    handle_startendtag = handle_starttag


def fetched(markdown_text: str) -> list[str]:
    """What a CommonMark renderer with raw HTML (as the Chatbot renders Markdown) makes the
    browser fetch."""
    from markdown_it import MarkdownIt

    parser = Fetches()
    parser.feed(MarkdownIt("commonmark").render(markdown_text))
    return parser.urls


C0_AND_SPACE = "".join(map(chr, range(0x21)))


def off_origin(url: str) -> bool:
    """Whether a browser on http://app.test/ would fetch ``url`` from elsewhere (an oracle
    of its own, through urllib: not the app's ``is_local_url``)."""
    url = re.sub(r"[\t\n\r]", "", url).strip(C0_AND_SPACE).replace("\\", "/")
    if url.lower().startswith(("data:", "blob:")):
        return False
    try:
        return urlsplit(urljoin("http://app.test/page/", url)).hostname != "app.test"
    except ValueError:
        return True


def remote_fetches(markdown_text: str) -> list[str]:
    out = []
    for value in fetched(markdown_text):
        parts = [value] if "url(" not in value.lower() else [EVIL] if EVIL in value else []
        out += [u for part in parts for u in re.split(r"[\s,]+", part) if u and off_origin(u)]
    return out


def assert_no_remote_image(text: str) -> None:
    assert not remote_fetches(text), text
    for image in ("cat.png", "a.png", "b.png", "rewrite.png"):  # the images' URLs are gone
        assert image not in text, text


# ============================================================================ A. no remote images
def test_remote_images_are_stored_intact_but_never_reach_the_page(app):
    url, ctx = app
    client = Client(url, verbose=False)
    history, _, _ = chat(client, IMAGES)
    shown = text_of(history[0])
    assert_no_remote_image(shown)
    assert "[image: a cat]" in shown and shown.count("[image]") == 2 and "[image: ref]" in shown
    assert "![ok](data:image/png;base64,iVBORw0KGgo=)" in shown  # an inline image stays
    assert "[a link](https://example.org/page)" in shown  # links are not images
    conv = conversation_of(ctx.store, IMAGES)
    assert ctx.store.conversation_messages(conv["id"])[0]["content"] == IMAGES  # stored as written
    # for comparison: without the sanitiser the same text would fetch from the other site (the
    # oracle's html.parser misses <IMG/SRC=...>, which a browser reads as an image: see the
    # browser test)
    assert len([u for u in remote_fetches(IMAGES) if EVIL in u]) == 3

    # an answer of the model's with remote images: the Chatbot, the comparison's answer A
    # and a rewrite (the user's answer) alike
    turns = ctx.store.conversation_messages(conv["id"])
    ctx.store.set_message(conv["id"], 1, "assistant", IMAGES, turns[1]["generation_id"])
    history, _ = client.predict(conv["id"], api_name="/open_conversation")
    assert_no_remote_image(text_of(history[1]))
    answer_a, _, _, _ = client.predict(*SAMPLING, api_name="/regenerate")
    assert_no_remote_image(answer_a) and "[image: a cat]" in answer_a
    client.predict("a", api_name="/vote")
    rewrite = f"My rewrite ![x](https://{EVIL}/rewrite.png)"
    history, _ = client.predict(rewrite, api_name="/edit")
    assert text_of(history[-1]) == "My rewrite [image: x]"
    assert ctx.store.query("SELECT b_text FROM comparisons WHERE source = 'edit' AND b_text = ?", (rewrite,))
    assert ctx.store.conversation_messages(conv["id"])[1]["content"] == rewrite


def test_the_components_that_show_messages_are_the_sanitising_ones(app):
    url, _ = app
    cfg = httpx.get(url + "/config").json()
    by_id = {c.get("props", {}).get("elem_id"): c for c in cfg["components"]}
    assert by_id["chatbot"]["type"] == "chatbot"  # the page renders them as Gradio's own
    assert all(by_id[f"answer-{x}"]["type"] == "markdown" for x in "abcd")
    shown = SafeMarkdown().postprocess(IMAGES)
    assert_no_remote_image(shown if isinstance(shown, str) else shown["value"])
    assert gr.Markdown().postprocess(IMAGES) in (IMAGES, {"value": IMAGES})  # only the safe one changes
    # Gradio rebuilds a component from its arguments after a gr.update(...) to it: still safe
    chat = SafeChatbot(elem_id="chatbot")
    rebuilt = type(chat)(**{**chat.constructor_args, "elem_classes": ["busy"], "render": False})
    assert_no_remote_image(rebuilt.postprocess([{"role": "user", "content": IMAGES}]).root[0].content[0].text)


NOISE = ["![", "](", ")", "[", "]", "]:", "`", "``", "\\", "!", "<", ">", "<a", " src=", " href=", "\"", "'",
         "/", "//", "\t", "\n", "\n\n", " ", "a", "[r]", "[r]: ", "<!--", "-->", "(", "&#47;", "data:", "1x, "]
REMOTE = st.sampled_from([f"https://{EVIL}/p.png", f"//{EVIL}/p.png", f"HTTP://{EVIL}/x", f"&#104;ttps://{EVIL}/e",
                          f"/\\{EVIL}/b", f" https://{EVIL}/s", f"<https://{EVIL}/angle>", f"//{EVIL}/a(b)c"])
ALT = st.text(alphabet="ab []`!*<>", max_size=6)
MD_IMAGE = st.builds(lambda alt, url, title: f"![{alt}]({url}{title})", ALT, REMOTE,
                     st.sampled_from(["", ' "t"', " 't'", " (t)", '\n"t"']))
MD_REF = st.builds(lambda alt, label, form, url: f"![{alt}]{form.format(label)}\n\n[{label}]: {url}\n", ALT,
                   st.sampled_from(["r", "R", "ref x"]), st.sampled_from(["[{}]", "[]", ""]), REMOTE)
HTML_IMAGE = st.builds(lambda tag, sep, attr, quote, url, extra: f"<{tag}{sep}{attr}={quote}{url.strip('<>')}{quote}{extra}>",
                       st.sampled_from(["img", "IMG", "video", "source", "image", "input type=image", "svg><image"]),
                       st.sampled_from([" ", "/", "\n", " alt='>' "]),
                       st.sampled_from(["src", "SRC", "srcset", "poster", "background", "href"]),
                       st.sampled_from(['"', "'", ""]), REMOTE, st.sampled_from(["", " alt=x", " /"]))
STYLE = st.builds(lambda url: f'<span style="background:url({url})">x</span>', REMOTE)
MARKUP = st.lists(st.one_of(MD_IMAGE, MD_REF, HTML_IMAGE, STYLE, st.sampled_from(NOISE)), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None, derandomize=True,  # the same examples on every run: no flaky CI
          suppress_health_check=[HealthCheck.too_slow])
@given(MARKUP)
def test_no_arrangement_of_markup_fetches_a_remote_image(pieces):
    text = "".join(pieces)
    clean = markup.no_remote_images(text)
    assert not remote_fetches(clean), (text, clean)
    assert markup.no_remote_images(clean) == clean
    if "![" not in text and "<" not in text:
        assert clean == text


@pytest.mark.parametrize("src, local", [
    ("x", True), ("/gradio_api/file=/tmp/a.png", True), ("data:image/png;base64,AA", True), ("blob:x", True),
    ("http://h/a.png", False), ("HTTPS://h", False), ("//h/a", False), ("/\\h/a", False), ("\\\\h", False),
    (" \t//h", False), ("ht\ttp://h", False), ("javascript:alert(1)", False),
    ("/gradio_api/file=https://h/a.png", False), ("/gradio_api/proxy=https://h/", False)])
def test_a_url_is_local_only_on_this_origin(src, local):
    assert markup.is_local_url(src) is local


# ============================================================================ A. the policy
def test_every_page_carries_the_content_security_policy(app):
    url, _ = app
    for path in ("/", "/console", "/config", "/gradio_api/info"):
        r = httpx.get(url + path)
        assert r.status_code == 200, (path, r.status_code)
        policy = r.headers.get("content-security-policy", "")
        assert "img-src 'self' data: blob:" in policy, (path, policy)
        assert "object-src 'none'" in policy and "frame-ancestors 'self'" in policy
    assert "content-security-policy" in httpx.post(url + "/gradio_api/upload", files={"files": ("f", b"x")}).headers


# ============================================================================ B. the body cap
def chat_body(url: str, message: str, padding: int = 0) -> dict:
    """What the browser posts to queue/join for /chat, ``padding`` extra bytes in the system prompt."""
    cfg = httpx.get(url + "/config").json()
    fn = next(d["id"] for d in cfg["dependencies"] if d.get("api_name") == "chat")
    return {"data": [message, "x" * padding, *SAMPLING, None], "fn_index": fn, "session_hash": uuid.uuid4().hex,
            "event_data": None, "trigger_id": None}


def test_a_body_over_the_limit_is_refused_before_the_app_reads_it(app):
    url, ctx = app
    limit = ctx.settings.max_request_bytes
    assert limit == Settings().max_request_bytes == 1024 * 1024
    tag = f"oversized-{uuid.uuid4().hex[:8]}"
    body = json.dumps(chat_body(url, tag, padding=limit)).encode()
    assert len(body) > limit
    declared = httpx.post(url + "/gradio_api/queue/join", content=body, headers={"content-type": "application/json"})
    assert declared.status_code == 413, declared.text[:200]
    assert declared.json() == {"error": f"request body too large: at most {limit} bytes", "limit_bytes": limit}

    def chunks(data: bytes, size: int = 64 * 1024):
        for i in range(0, len(data), size):
            yield data[i:i + size]

    chunked = httpx.post(url + "/gradio_api/queue/join", content=chunks(body),
                         headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["limit_bytes"] == limit
    huge = httpx.post(url + "/gradio_api/queue/join", content=chunks(b"x" * (30 << 20), 1 << 20))
    assert huge.status_code == 413
    assert not ctx.store.query("SELECT 1 FROM messages WHERE content = ?", (tag,))

    # a body under the limit reaches the app, chunked too; so does the largest a user can send:
    # the longest message and system prompt, each character escaped as \u0001 (6 bytes)
    small = json.dumps(chat_body(url, "a small one", padding=10)).encode()
    ok = httpx.post(url + "/gradio_api/queue/join", content=chunks(small, 100),
                    headers={"content-type": "application/json"})
    assert ok.status_code == 200 and "event_id" in ok.json(), ok.text[:200]
    longest = chat_body(url, "\u0001" * ctx.settings.max_message_chars)
    longest["data"][1] = "\u0001" * ctx.settings.max_message_chars
    largest = json.dumps(longest).encode()
    assert len(largest) < limit / 10
    ok = httpx.post(url + "/gradio_api/queue/join", content=largest, headers={"content-type": "application/json"})
    assert ok.status_code == 200 and "event_id" in ok.json(), ok.text[:200]


def test_the_body_cap_is_a_setting():
    assert parse(["--max-request-bytes", "2048"]).max_request_bytes == 2048
    assert parse([]).max_request_bytes == 1024 * 1024
    assert from_namespace(None, {"ASSISTANT_MAX_REQUEST_BYTES": "0"}).max_request_bytes == 0


# ============================================================================ C. uploads
def cache_files() -> set[Path]:
    root = Path(os.environ.get("GRADIO_TEMP_DIR") or gr.utils.get_upload_folder())
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def test_the_upload_routes_are_shut(app):
    url, _ = app
    before = cache_files()
    for _ in range(3):
        r = httpx.post(url + "/gradio_api/upload", files=[("files", (f"f{i}.bin", b"\0" * 1000)) for i in range(50)])
        assert r.status_code == 403 and r.json() == {"error": "this app takes no file uploads"}
    r = httpx.post(url + "/gradio_api/process_recording", files={"video": ("v.mp4", b"\0" * 100)})
    assert r.status_code == 403
    assert not {p for p in cache_files() - before if p.name.startswith("f") and p.suffix == ".bin"}
    fetch = httpx.get(url + "/gradio_api/file=https://example.com/x.png")
    assert fetch.status_code == 403 and "not other sites" in fetch.json()["error"]


def test_no_component_of_the_app_takes_files_but_one_that_does_opens_the_route(app):
    _, ctx = app
    assert ctx.extras["uploads_open"] is False  # what ``launch`` found in the app's Blocks
    with gr.Blocks() as takes:
        f = gr.File(label="Your file")
        out = gr.Textbox()
        f.upload(lambda x: str(x), f, out)
    assert http_guard.takes_uploads(takes) is True
    with gr.Blocks() as shows:
        gr.File(interactive=False)
        gr.Image(interactive=False)
    assert http_guard.takes_uploads(shows) is False


# ============================================================================ D. X-Forwarded-For
@pytest.fixture(scope="module")
def default_proxy_app(tmp_path_factory, tiny_model_dir):
    """The default ``--trusted-proxies`` (none); opt-outs limited to 2 per minute per client."""
    settings = app_settings(tmp_path_factory.mktemp("no-proxy"), tiny_model_dir, rate_votes_per_minute=2,
                            admin_password=PASSWORD)
    assert settings.trusted_proxies == "" == Settings().trusted_proxies
    url, ctx, close = launch_app(settings)
    yield url.rstrip("/"), ctx
    close()


def test_a_forged_forwarded_for_from_loopback_changes_no_limit(default_proxy_app):
    url, ctx = default_proxy_app
    assert os.environ["FORWARDED_ALLOW_IPS"] == ""
    forged = [f"198.18.0.{n}" for n in range(1, 5)]
    assert "will not be used" in Client(url, verbose=False, headers={"X-Forwarded-For": forged[0]}).predict(
        True, api_name="/opt_out")
    assert "will not be used" in Client(url, verbose=False, headers={"X-Forwarded-For": forged[1]}).predict(
        True, api_name="/opt_out")
    for address in forged[2:]:  # a new address each time: still the same client (127.0.0.1)
        with pytest.raises(AppError, match="too many opt-out requests: at most 2 per minute"):
            Client(url, verbose=False, headers={"X-Forwarded-For": address}).predict(False, api_name="/opt_out")

    # nor resets the console's login lockout
    for n in range(5):
        c = RawConsole(url)
        c.http.headers["X-Forwarded-For"] = f"198.19.0.{n + 1}"
        ok, out = c.call("login", "admin", f"wrong-{n}")
        assert not ok and "wrong user name or password" in out
    c = RawConsole(url)
    c.http.headers["X-Forwarded-For"] = "198.19.1.1"
    ok, out = c.call("login", "admin", PASSWORD)
    assert not ok and "too many failed logins" in out


# ============================================================================ E. chats per browser
def test_a_browser_keeps_at_most_its_cap_of_chats_and_sees_them_all(app):
    url, ctx = app
    client = Client(url, verbose=False)
    chat(client, "chat cap first")
    client.predict(api_name="/new_chat")
    chat(client, "chat cap second")
    client.predict(api_name="/new_chat")
    before, written = ctx.store.db["conversations"].count, ctx.store.db["generations"].count
    with pytest.raises(AppError, match=r"you already have 2 chats, the most this server keeps for one browser"):
        chat(client, "chat cap third")
    assert ctx.store.db["conversations"].count == before
    assert ctx.store.db["generations"].count == written  # refused before an answer was written
    assert not ctx.store.query("SELECT 1 FROM messages WHERE content = 'chat cap third'")
    chats = client.predict(api_name="/conversations")
    assert sorted(c["title"] for c in chats) == ["chat cap first", "chat cap second"]
    # an existing chat goes on; an edit that would branch a new one is refused the same way
    first = next(c["id"] for c in chats if c["title"] == "chat cap first")
    client.predict(first, api_name="/open_conversation")
    history, _, _ = chat(client, "chat cap first, continued")
    assert len(history) == 4
    with pytest.raises(AppError, match="you already have 2 chats"):
        client.predict(0, "chat cap first, edited", *SAMPLING, api_name="/edit_message")
    assert len(client.predict(api_name="/conversations")) == 2
    # deleting the data makes room again
    client.predict(True, api_name="/delete_my_data")
    chat(client, "chat cap after deleting")
    assert [c["title"] for c in client.predict(api_name="/conversations")] == ["chat cap after deleting"]


def test_the_cap_counts_the_owner_across_sessions_and_holds_under_a_race(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    try:
        store.max_chats_per_owner = 3
        owner = owner_hash("browser-key")
        for n in range(3):
            store.ensure_session(f"s{n}", owner=owner)  # three page loads of one browser
            conv = store.start_conversation(f"s{n}", "sys")
            store.set_message(conv, 0, "user", f"q{n}")
        store.ensure_session("s3", owner=owner)
        with pytest.raises(TooManyChats, match="you already have 3 chats"):
            store.start_conversation("s3", "sys")
        store.ensure_session("other", owner=owner_hash("another-browser"))
        store.start_conversation("other", "sys")  # another browser is not affected

        # two windows taking the last place at once: exactly one gets it
        store.max_chats_per_owner = 4
        results: list[str] = []
        barrier = threading.Barrier(2)

        def start(session_id: str) -> None:
            barrier.wait()
            try:
                with store.transaction():  # as the chat service does: the chat and its first message together
                    conv = store.start_conversation(session_id, "sys")
                    store.set_message(conv, 0, "user", f"race {session_id}")
                results.append("ok")
            except TooManyChats:
                results.append("refused")

        threads = [threading.Thread(target=start, args=(sid,)) for sid in ("s0", "s3")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["ok", "refused"]
        assert store.owner_chat_count(owner) == 4
    finally:
        store.close()


def test_the_list_shows_every_chat_not_the_newest_200(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")
    try:
        store.max_chats_per_owner = 0  # no cap
        owner = owner_hash("many-chats")
        store.ensure_session("s", owner=owner)
        with store.transaction():
            for n in range(230):
                conv = store.start_conversation("s", "sys")
                store.set_message(conv, 0, "user", f"chat {n}")
        assert len(store.owner_conversations(owner)) == 230
        store.max_chats_per_owner = 250
        assert len(store.owner_conversations(owner)) == 230
        assert parse(["--max-chats-per-browser", "7"]).max_chats_per_browser == 7
        assert Settings().max_chats_per_browser == 200
    finally:
        store.close()
