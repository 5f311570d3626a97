"""The page at `/` in headless Chromium: it loads, a question gets its streamed answer, and the
audio element ends up holding playable audio. A screenshot goes to bench/results/ with
SPARKEE_WRITE_SCREENSHOT=1 (else to a temporary directory)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from sparkee import load_model, resolve_heads  # noqa: E402
from sparkee.profiles import load_profile, resolve_config  # noqa: E402
from sparkee.refslm import bundled_model_dir  # noqa: E402
from sparkee.refslm.audio import espeak_available  # noqa: E402
from sparkee.serve import build_server  # noqa: E402
from test_serve import Running  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
# the committed screenshot is remade on request only (a test run never dirties the tree)
SHOT = Path(__file__).resolve().parents[1] / "bench" / "results" / "serve_page.png"
WRITE_SHOT = os.environ.get("SPARKEE_WRITE_SCREENSHOT") == "1"


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="chromium is not installed")
@pytest.mark.skipif(not espeak_available(), reason="espeak-ng and sox are needed for audio")
def test_the_page_answers_a_question_with_text_and_playable_audio(tmp_path):
    d = bundled_model_dir()
    bb = load_model(d)
    profile = load_profile(d, bb=bb)
    server = build_server(bb, resolve_heads(str(profile.heads), bb), profile, resolve_config(profile, {}))
    r = Running(server)
    requests = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.on("request", lambda req: requests.append(req.url))
            page.goto(r.url + "/")
            page.wait_for_function("document.querySelectorAll('#policy option').length >= 2", timeout=20000)
            page.select_option("#policy", index=1)  # SPAR-K, verified
            page.fill("#question", "tell me one plus two")
            page.click("#go")
            page.wait_for_function("document.body.dataset.state === 'done'", timeout=60000)
            answer = page.inner_text("#answer")
            assert answer == "one plus two is three", answer
            assert page.inner_text("#ttft").endswith("ms") and page.inner_text("#ttfa").endswith("ms")
            assert "/ 16" in page.inner_text("#exit")  # a SPAR-K row's average exit layer
            page.wait_for_function(
                "(() => { const a = document.getElementById('audio');"
                " return a.src.startsWith('blob:') && a.readyState >= 1 && a.duration > 0.2; })()",
                timeout=20000,
            )
            shot = SHOT if WRITE_SHOT else tmp_path / SHOT.name
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        r.stop()
    assert all(u.startswith((r.url, "blob:", "data:")) for u in requests), requests  # no CDN
