"""The playground page at / in a real browser: Debian's headless Chromium driven by Playwright,
against a live server whose in-process worker runs the tiny model. Screenshots at desktop and
phone width go to test-output/.

Chromium comes from the system (``apt-get install chromium``; .ci/run installs it): without it
these tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import IN_CI, media_path, png_of

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
FAST = {"width": "64", "height": "64", "steps": "2"}
TIMEOUT_MS = 30_000


def _chromium() -> str | None:
    return shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).exists()), None)


def _unavailable(why: str) -> None:
    if IN_CI:
        pytest.fail(f"{why}; it is required under CI=true")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        _unavailable("Chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -r requirements-dev.txt)")
    # Playwright's sync API keeps an event loop on this thread, so Django's guard against ORM
    # calls from async code would trip on the fixtures' own database work (flushes between tests).
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser, live_server, live_db, tiny_model_dirs) -> Iterator[Any]:  # noqa: ANN001
    """A fresh browser context on the live server; any script error or refused load (a CSP
    violation shows as a console error) fails the test."""
    context = browser.new_context(viewport=DESKTOP, base_url=live_server.url)
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    tab.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
    tab.on("dialog", lambda dialog: dialog.accept())
    tab.problems = problems  # a test that expects an error answer (400, 401, 503) takes its note out
    try:
        yield tab
    finally:
        context.close()
    assert not problems, problems


def expected_400(page: Any) -> None:
    """The browser's console notes each 400 answer; those of a rejected form are expected."""
    page.problems[:] = [p for p in page.problems if "status of 400" not in p]


def open_playground(page: Any) -> None:
    page.goto("/")
    page.wait_for_selector("html[data-ready='true']")


def fill(page: Any, values: dict[str, str]) -> None:
    for name, value in values.items():
        page.fill(f"#{name}", value)


def wait_done(page: Any, previous_src: str | None = None) -> str:
    """Waits for the job to end with its image in the gallery, loaded; returns the image's URL."""
    page.wait_for_function(
        """prev => { const i = document.querySelector('#gallery img');
                     return i && i.complete && i.naturalWidth > 0 && i.src !== prev; }""",
        arg=previous_src,
    )
    return page.locator("#gallery img").first.get_attribute("src")


def http(base: str, path: str, body: dict[str, Any] | None = None, key: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - the live server on loopback
        return json.loads(response.read())


def results(base: str) -> list[dict[str, Any]]:
    return http(base, "/api/results/?page_size=100")["results"]


def make_results(base: str, n: int) -> None:
    """n finished generations, made through the API (asynchronously, so they batch)."""
    ids = [
        http(base, "/api/txt2img/", {"prompt": f"history {i}", "seed": i, **FAST, "steps": 1, "async": True})["id"]
        for i in range(n)
    ]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(http(base, f"/api/results/{i}/")["status"] == "succeeded" for i in ids):
            return
        time.sleep(0.1)
    pytest.fail("the generations did not finish")


def test_generate_shows_the_image_and_reuse_plus_generate_makes_the_same_png(page, live_server):
    open_playground(page)
    fill(page, {"prompt": "a lighthouse at dusk", **FAST})
    page.press("#prompt", "Control+Enter")  # the keyboard way to Generate
    first_src = wait_done(page)
    assert page.locator("#gallery img").first.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 64]
    first = results(live_server.url)[0]
    assert re.fullmatch(rf"Done: 1 image, seed {first['seed']} in \d+\.\d s\.", page.inner_text("#job-status"))
    assert first_src == first["images"][0]["url"]

    # The history grid shows the WebP thumbnail, not the PNG.
    card = page.locator(f"#history-grid .card[data-id='{first['id']}']")
    thumb = card.locator("img")
    assert thumb.get_attribute("src") == first["images"][0]["thumbnail_url"]
    assert thumb.get_attribute("src").endswith(".thumb.webp")
    page.wait_for_function("i => i.complete && i.naturalWidth === 64", arg=thumb.element_handle())

    # Open it large, reuse its parameters and seed, and make it again.
    card.click()
    dialog = page.locator("#detail")
    assert dialog.is_visible()
    assert f"{first['seed']}" in dialog.locator("#detail-params").inner_text()
    assert dialog.locator("#detail-images img").get_attribute("src") == first["images"][0]["url"]
    page.click("#detail-reuse")
    assert not dialog.is_visible()
    assert page.input_value("#seed") == str(first["seed"])
    assert page.input_value("#prompt") == "a lighthouse at dusk"
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.click("#generate")
    second_src = wait_done(page, first_src)
    second = results(live_server.url)[0]
    assert second["id"] != first["id"] and second["params"]["seed"] == first["params"]["seed"]
    assert second_src == second["images"][0]["url"]
    assert media_path(second_src).read_bytes() == media_path(first_src).read_bytes()


def test_progress_and_live_previews_show_while_a_slow_job_runs_and_cancel_stops_it(page, live_server, settings):
    settings.PROGRESS_MIN_INTERVAL = 0.0
    settings.PREVIEW_INTERVAL = 0.0
    open_playground(page)
    fill(page, {"prompt": "a slow one", "width": "64", "height": "64", "steps": "150"})
    assert page.locator("#cancel").is_disabled()
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#progress').value >= 3")
    assert re.fullmatch(r"Step \d+ of 150( · about \d+ s left)?", page.inner_text("#progress-text"))
    assert page.locator("#progress").get_attribute("max") == "150"
    page.wait_for_function("() => (document.querySelector('#live-preview').src || '').startsWith('data:image/png')")
    assert page.locator("#live-preview").is_visible()
    assert page.locator("#generate").is_disabled()
    page.click("#cancel")
    page.wait_for_function("() => document.querySelector('#job-status').textContent === 'Cancelled.'")
    assert not page.locator("#progress-row").is_visible()
    assert page.locator("#gallery img").count() == 0
    assert page.locator("#generate").is_enabled()
    job = results(live_server.url)[0]
    assert job["status"] == "cancelled" and job["images"] == []
    assert job["progress"]["step"] < 150


def test_without_the_event_stream_the_page_polls_the_resource(page, live_server, settings):
    settings.SSE_MAX_STREAMS = 0  # every stream is refused with a 503
    answers: list[tuple[str, int]] = []
    page.on("response", lambda r: "/api/results/" in r.url and answers.append((r.url, r.status)))
    open_playground(page)
    fill(page, {"prompt": "polled", **FAST})
    page.click("#generate")
    src = wait_done(page)
    job = results(live_server.url)[0]
    assert src == job["images"][0]["url"]
    assert (f"{live_server.url}/api/results/{job['id']}/events/", 503) in answers
    assert (f"{live_server.url}/api/results/{job['id']}/", 200) in answers
    page.problems[:] = [p for p in page.problems if "status of 503" not in p]


def test_bad_values_show_the_apis_messages_next_to_their_fields(page, live_server):
    open_playground(page)
    fill(page, {"prompt": "x", "width": "65", "steps": "0", "guidance_scale": "lots"})
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#width-error').textContent !== ''")
    assert page.inner_text("#width-error") == "width must be a multiple of 8 between 64 and 2048, got 65"
    assert page.inner_text("#steps-error") == "steps must be between 1 and 150, got 0"
    assert page.inner_text("#guidance_scale-error") == "A valid number is required."
    for name in ("width", "steps", "guidance_scale"):
        assert page.get_attribute(f"#{name}", "aria-invalid") == "true"
        assert f"{name}-error" in page.get_attribute(f"#{name}", "aria-describedby")
    assert page.inner_text("#height-error") == ""
    assert page.get_attribute("#height", "aria-invalid") is None
    assert page.inner_text("#job-status").startswith("Not generated: width must be a multiple of 8")
    assert results(live_server.url) == []  # nothing was created

    # Fixed, the same form generates, and the messages go.
    fill(page, {"width": "64", "steps": "2", "guidance_scale": ""})
    page.click("#generate")
    wait_done(page)
    assert page.inner_text("#width-error") == ""
    assert page.get_attribute("#width", "aria-invalid") is None
    expected_400(page)


def test_history_pages_open_delete_and_keyboard(page, live_server):
    make_results(live_server.url, 7)
    open_playground(page)
    page.select_option("#page-size", "6")
    page.wait_for_function("() => document.querySelectorAll('#history-grid .card').length === 6")
    assert page.inner_text("#page-info") == "Page 1 of 2"
    assert page.inner_text("#history-status") == "7 generations"
    assert page.locator("#page-prev").is_disabled()
    prompts = page.locator("#history-grid .card .caption").all_inner_texts()
    assert prompts == [f"history {i}" for i in range(6, 0, -1)]  # newest first

    page.click("#page-next")
    page.wait_for_function("() => document.querySelector('#page-info').textContent === 'Page 2 of 2'")
    assert page.locator("#history-grid .card .caption").all_inner_texts() == ["history 0"]
    assert page.locator("#page-next").is_disabled() and page.locator("#page-prev").is_enabled()

    # Keyboard: open the card with Enter, close with Escape, focus returns to the card.
    card = page.locator("#history-grid .card").first
    card.focus()
    page.keyboard.press("Enter")
    assert page.locator("#detail").is_visible()
    assert "history 0" in page.inner_text("#detail-params")
    page.keyboard.press("Escape")
    assert not page.locator("#detail").is_visible()
    assert page.evaluate("document.activeElement.dataset.id") == card.get_attribute("data-id")

    # Delete it: page 2 is gone, so the history goes back to page 1.
    card.click()
    page.click("#detail-delete")  # the confirm() is accepted by the fixture
    page.wait_for_function("() => document.querySelector('#page-info').textContent === 'Page 1 of 1'")
    assert page.locator("#history-grid .card").count() == 6
    assert [r["params"]["prompt"] for r in results(live_server.url)] == [f"history {i}" for i in range(6, 0, -1)]


def test_inpaint_sends_the_painted_mask_and_keeps_the_rest(page, live_server):
    open_playground(page)
    page.check("input[name='mode'][value='inpaint']")
    assert page.locator("#mask-editor").is_visible() and page.locator("#mask_blur").is_visible()
    page.set_input_files("#image", files=[{"name": "in.png", "mimeType": "image/png", "buffer": png_of((20, 90, 200))}])
    page.wait_for_function("() => document.querySelector('#mask-canvas').width === 64")
    fill(page, {"prompt": "a red door", "width": "64", "height": "64", "steps": "4", "mask_blur": "0"})
    page.fill("#brush-size", "20")
    box = page.locator("#mask-canvas").bounding_box()
    # A stroke across the left half of the image, drawn with the mouse.
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    page.click("#generate")
    src = wait_done(page)
    job = results(live_server.url)[0]
    assert job["kind"] == "inpaint" and job["status"] == "succeeded"
    with Image.open(media_path(src).parents[2] / "inputs" / f"{job['id']}-mask.png") as mask:
        gray = mask.convert("L")
        assert gray.size == (64, 64)
        assert gray.getpixel((16, 32)) == 255  # painted: repaint
        assert gray.getpixel((60, 5)) == 0 and gray.getpixel((5, 5)) == 0  # not painted: keep
    with Image.open(io.BytesIO(media_path(src).read_bytes())) as out:
        assert out.convert("RGB").getpixel((60, 5)) == (20, 90, 200)  # outside the mask: as sent


def test_an_api_key_is_asked_for_when_required_and_kept(page, live_server, settings):
    from tests.api.test_access import new_key

    settings.AUTH_REQUIRED = True
    key = new_key("playground")
    open_playground(page)
    assert page.locator("#auth").evaluate("d => d.open")
    assert page.locator("#api-key-required-note").is_visible()
    assert page.inner_text("#api-key-error") == "an API key is required: send 'Authorization: Bearer <key>'"
    assert page.locator("#model_id option").count() == 0
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    page.wait_for_function("() => document.querySelectorAll('#model_id option').length > 0")
    assert page.input_value("#model_id") == "tiny-sd"
    assert page.inner_text("#api-key-error") == ""
    fill(page, {"prompt": "with a key", **FAST})
    page.click("#generate")
    wait_done(page)
    assert http(live_server.url, "/api/results/", key=key)["count"] == 1

    # Kept in localStorage: a reload needs nothing typed.
    page.reload()
    page.wait_for_selector("html[data-ready='true']")
    assert page.input_value("#api-key") == key
    assert page.locator("#model_id option").count() > 0
    assert page.locator("#history-grid .card").count() == 1
    page.problems[:] = [p for p in page.problems if "status of 401" not in p]  # before the key was given


def test_desktop_and_phone_screenshots_labels_and_no_sideways_scroll(page, live_server):
    make_results(live_server.url, 2)
    open_playground(page)
    fill(page, {"prompt": "a lighthouse at dusk", **FAST, "seed": "42"})
    page.click("#generate")
    wait_done(page)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#history-grid img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    OUTPUT.mkdir(exist_ok=True)
    # Every control has a name a screen reader reads out.
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button, canvas')]
                 .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                              && !e.getAttribute('aria-labelledby') && !e.closest('label')
                              && !(e.tagName === 'BUTTON' && e.textContent.trim()))
                 .map(e => e.id || e.outerHTML)"""
    )
    assert unlabelled == []
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(viewport)
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page scrolls sideways by {overflow}px at {viewport['width']}px"
        path = OUTPUT / f"playground-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        with Image.open(path) as shot:
            assert shot.width == viewport["width"] and shot.height >= viewport["height"]


def test_the_page_assets_and_security_headers(live_server, live_db):
    with urllib.request.urlopen(live_server.url + "/", timeout=30) as response:  # noqa: S310
        html = response.read().decode()
        csp = response.headers["Content-Security-Policy"]
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Frame-Options"] == "DENY"
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "img-src 'self' data: blob:" in csp
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(ref.startswith(("/", "#", "data:")) for ref in refs), refs  # nothing from elsewhere
    version = re.search(r"/playground/app\.js\?v=(\w+)", html).group(1)
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        with urllib.request.urlopen(f"{live_server.url}/playground/{name}?v={version}", timeout=30) as response:  # noqa: S310
            assert response.headers["Content-Type"] == f"{kind}; charset=utf-8"
            assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
            assert response.headers["ETag"] == f'"{version}"'
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        with urllib.request.urlopen(f"{live_server.url}/playground/{name}", timeout=30) as response:  # noqa: S310
            assert response.headers["Cache-Control"] == "no-cache"  # unversioned: revalidate
    for path in ("/playground/index.html", "/playground/..%2Fviews.py", "/playground/"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(live_server.url + path, timeout=30)  # noqa: S310
        assert caught.value.code == 404
    # The API is untouched beside it.
    assert http(live_server.url, "/api/health/") == {"status": "ok"}


def test_loras_are_offered_for_the_models_family_sent_with_their_weights_reused_and_refused_beside_their_field(
    page, live_server, tiny_model_dirs, tmp_path, monkeypatch
):
    import dataclasses

    from backend.manager import get_manager
    from tests.fakes.tiny_adapters import make_tiny_lora

    loras = tmp_path / "loras"
    make_tiny_lora(tiny_model_dirs["tiny-sd"], loras / "fox.safetensors", key_format="diffusers", seed=1)
    make_tiny_lora(
        tiny_model_dirs["tiny-sdxl"], loras / "xl-only.safetensors", key_format="kohya", seed=3, text_encoder=True
    )
    manager = get_manager()  # the live server's in-process worker and its views share it
    monkeypatch.setattr(manager, "config", dataclasses.replace(manager.config, lora_dir=loras))

    open_playground(page)
    assert page.locator("#loras-fieldset").is_visible()
    names = page.locator("#loras-list input[type=checkbox]").evaluate_all("els => els.map(e => e.value)")
    assert sorted(names) == ["fox", "xl-only"]
    fox = names.index("fox")
    fill(page, {"prompt": "a red fox", **FAST, "seed": "5"})
    page.check(f"#lora-{fox}")
    page.fill(f"#lora-weight-{fox}", "0.8")
    page.click("#generate")
    first_src = wait_done(page)
    first = results(live_server.url)[0]
    assert [(lora["name"], lora["weight"]) for lora in first["params"]["loras"]] == [("fox", 0.8)]

    # Reuse puts the LoRA and its weight back, and Generate makes the same PNG.
    page.uncheck(f"#lora-{fox}")
    page.fill(f"#lora-weight-{fox}", "1")
    page.locator(f"#history-grid .card[data-id='{first['id']}']").click()
    page.click("#detail-reuse")
    assert page.is_checked(f"#lora-{fox}") and page.input_value(f"#lora-weight-{fox}") == "0.8"
    page.click("#generate")
    second_src = wait_done(page, first_src)
    assert media_path(second_src).read_bytes() == media_path(first_src).read_bytes()

    # A LoRA made for another family can't be picked with this model, and says what it is for.
    xl = 1 - fox
    assert page.is_disabled(f"#lora-{xl}") and page.is_disabled(f"#lora-weight-{xl}")
    assert page.inner_text(f"label[for='lora-{xl}']") == "xl-only (for sdxl models)"
    page.select_option("#model_id", "tiny-sdxl")
    assert page.is_enabled(f"#lora-{xl}") and page.inner_text(f"label[for='lora-{xl}']") == "xl-only"
    assert page.is_enabled(f"#lora-{fox}")  # its family can't be told from its keys: always offered
    page.select_option("#model_id", "tiny-sd")

    # A weight the API refuses: its message is shown beside the LoRAs, and nothing is created.
    page.fill(f"#lora-weight-{fox}", "5")
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#loras-error').textContent !== ''")
    assert page.inner_text("#loras-error") == "the weight of LoRA 'fox' must be between -2.0 and 2.0, got 5.0"
    assert len(results(live_server.url)) == 2
    expected_400(page)
