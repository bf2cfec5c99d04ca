"""The chat and console pages in a real headless browser (Debian's chromium via Playwright)
under the Content-Security-Policy: they load and work with no violation of it, a message
full of remote images makes the browser fetch nothing from another site, external links get
rel="noopener noreferrer nofollow", an image injected from another site is blocked by the
policy, and the largest request the page sends stays far below the request-body cap.

Skipped when the ``playwright`` package or ``/usr/bin/chromium`` is missing."""

from __future__ import annotations

from assistant import http_guard
from tests.browser import DESKTOP, chromium, expect, fill_kept, idle, needs_chromium
from tests.factories import PASSWORD, app_settings, launch_app, wait_for

pytestmark = needs_chromium
EVIL = "evil.example"
HOSTILE = (f"Look ![a cat](https://{EVIL}/cat.png) <img src=http://{EVIL}/a.png> <IMG/SRC=\"&#104;ttps://{EVIL}/b\"> "
           f"<picture><source srcset=\"https://{EVIL}/s.png 1x\"><img src=x.png></picture> "
           f"<video poster=//{EVIL}/p.png></video> <span style=\"background:url(//{EVIL}/bg.png)\">bg</span> "
           f"<svg><image href=https://{EVIL}/svg.png /></svg> ![ref][r] "
           f"[a link](https://example.org/page) <a href=https://example.org/raw>raw</a> end-of-hostile\n\n"
           f"[r]: https://{EVIL}/ref.png")
# records the policy's violations from the first script on: a blocked load of any kind
WATCH = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
         "(e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
FETCHING = """() => [...document.querySelectorAll('#chatbot *')].flatMap((e) =>
    ['src', 'srcset', 'poster', 'background', 'style', 'href', 'xlink:href']
      .filter((a) => e.hasAttribute(a) && !(a === 'href' && e.tagName === 'A'))
      .map((a) => e.tagName + ' ' + a + '=' + e.getAttribute(a)))"""


def recording_bodies(monkeypatch) -> list[tuple[str, int]]:
    """(path, bytes) of every request body the server receives, counted in the server (the
    page's queue calls did not show up in Playwright's request events)."""
    bodies: list[tuple[str, int]] = []
    guard = http_guard.HttpGuard.__call__

    async def recording(self, scope, receive, send):
        if scope["type"] != "http":
            return await guard(self, scope, receive, send)
        size = 0

        async def counting():
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                bodies.append((scope["path"], size))
            return message
        return await guard(self, scope, counting, send)

    monkeypatch.setattr(http_guard.HttpGuard, "__call__", recording)
    return bodies


def test_the_pages_work_under_the_policy_and_fetch_no_remote_image(tmp_path, tiny_model_dir, monkeypatch):
    posted = recording_bodies(monkeypatch)
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir, admin_password=PASSWORD))
    elsewhere: list[str] = []
    try:
        with chromium() as browser:
            context = browser.new_context(viewport=DESKTOP)
            context.add_init_script(WATCH)
            page = context.new_page()
            page.set_default_timeout(30_000)
            context.on("request", lambda r: EVIL in r.url and elsewhere.append(r.url))
            page.goto(url)
            expect(page.locator("#chatbot")).to_be_visible()
            expect(page.locator("#message textarea")).to_be_editable()
            assert page.evaluate("window.__csp") == []  # Gradio's page itself needs nothing the policy blocks

            box = page.locator("#message textarea")
            box.fill(HOSTILE)
            box.press("Enter")
            assert wait_for(lambda: ctx.store.query("SELECT 1 FROM messages WHERE role = 'assistant' AND turn = 1"),
                            timeout_s=60) and idle(ctx)
            stored = ctx.store.query("SELECT content FROM messages WHERE role = 'user'")
            assert [r["content"] for r in stored] == [HOSTILE]  # stored as written
            chatbot = page.locator("#chatbot")
            expect(chatbot).to_contain_text("end-of-hostile")
            expect(chatbot).to_contain_text("[image: a cat]")
            shown = page.evaluate(FETCHING)
            assert not [s for s in shown if EVIL in s], shown
            assert elsewhere == [] and page.evaluate("window.__csp") == []  # nothing even tried
            for href in ("https://example.org/page", "https://example.org/raw"):
                link = chatbot.locator(f"a[href='{href}']")
                expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
                expect(link).to_have_attribute("target", "_blank")

            # what the policy does for an image the sanitiser never saw
            blocked = page.evaluate("""() => new Promise((resolve) => {
                document.addEventListener('securitypolicyviolation', (e) => resolve(e.violatedDirective),
                                          {once: true});
                const img = document.createElement('img');
                img.src = 'https://evil.example/injected.png';
                document.body.appendChild(img);
                setTimeout(() => resolve('not blocked'), 5000);
            })""")
            assert blocked == "img-src"

            # the largest legitimate request: the longest message and system prompt, every
            # character one the browser's JSON escapes (\u0001, 6 bytes)
            page.get_by_role("button", name="Settings").click()
            prompt = page.get_by_label("System prompt")
            # the closed accordion mounts its fields on the first open, and can set them back to
            # the server's value once after that (seen twice in full runs): fill until it stays
            expect(prompt).to_have_value(ctx.settings.system_prompt)
            expect(prompt).to_be_editable()
            fill_kept(prompt, "\u0001" * ctx.settings.max_message_chars)
            expect(prompt).to_have_value("\u0001" * ctx.settings.max_message_chars)
            box.fill("\u0001" * ctx.settings.max_message_chars)
            expect(box).to_have_value("\u0001" * ctx.settings.max_message_chars)
            assert idle(ctx)
            posted.clear()
            box.press("Enter")
            assert wait_for(lambda: any(size > 2 * 6 * ctx.settings.max_message_chars for _, size in posted), 60), \
                posted[-6:]
            largest = max(size for _, size in posted)
            print(f"largest request body of the page: {largest} bytes "
                  f"(cap {ctx.settings.max_request_bytes}: {ctx.settings.max_request_bytes / largest:.0f} x)")
            assert largest < ctx.settings.max_request_bytes / 10
            idle(ctx)

            console = context.new_page()
            console.goto(url.rstrip("/") + "/console")
            expect(console.locator("#console-user")).to_be_visible()
            assert console.evaluate("window.__csp") == []
    finally:
        close()
