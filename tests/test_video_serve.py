"""Clips behind the real Serve app: each clip's media is a playable cut of its source, the
gallery plays clips in a real headless Chromium, and the report shows clip strips."""

from __future__ import annotations

import base64
import io
import re
import shutil

import pytest
import requests
from PIL import Image

from curate import Pipeline, load_config
from curate.media.video import VideoSource, probe

from .conftest import ROOT, serve_settings
from .test_gallery import CHROMIUM, FLAGS, screenshot

FPS = 24


@pytest.fixture(scope="module")
def clip_store(ray_session, tmp_path_factory):
    from curate.media.samples import write_video_with_cuts

    root = tmp_path_factory.mktemp("clip-store")
    media = root / "media"
    media.mkdir()
    write_video_with_cuts(media / "cuts.mp4", [2.0, 3.0, 2.5], (640, 360), fps=FPS, seed=2)
    shutil.copy(ROOT / "examples" / "videos" / "broken" / "notes.mp4", media)
    config = {"name": "clips", "store": {"uri": str(root / "store"), "table": "samples"},
              "stages": [{"type": "ingest_videos", "paths": [str(media)]},
                         {"type": "split_clips", "method": "scenes"},
                         {"type": "image_quality"}]}
    Pipeline.from_config(load_config(config)).run(progress=False)
    return root


@pytest.fixture(scope="module")
def clip_server(clip_store):
    from curate.serve.config import load_serve_config
    from curate.serve.server import start, stop

    url = start(load_serve_config(serve_settings(clip_store / "store")))
    yield url
    stop()


def get(url: str, **params) -> requests.Response:
    return requests.get(url, params=params, timeout=120)


def clips(base: str) -> list[dict]:
    rows = get(base + "/samples", where="media_type = 'video_clip'", limit=100,
               order_by="clip_index").json()["rows"]
    assert len(rows) == 3
    return rows


def test_a_clips_media_is_a_playable_cut_of_just_that_clip(clip_server, tmp_path):
    for row in clips(clip_server):
        for container, codec, mime in (("mp4", "h264", "video/mp4"),
                                       ("webm", "vp9", "video/webm")):
            response = get(f"{clip_server}/samples/{row['sample_id']}/media", format=container)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == mime
            path = tmp_path / f"{row['clip_index']}.{container}"
            path.write_bytes(response.content)
            info = probe(VideoSource(str(path)))
            span = row["clip_end_s"] - row["clip_start_s"]
            assert info.codec == codec and abs(info.duration_s - span) <= 2 / FPS
            assert info.num_frames == row["num_frames"]
        poster = get(f"{clip_server}/samples/{row['sample_id']}/thumbnail", size=128)
        assert Image.open(io.BytesIO(poster.content)).size == (128, 72)
    broken = get(clip_server + "/samples", where="media_type = 'video'").json()["rows"]
    assert [r["error"].split(":")[0] for r in broken] == ["not_a_video"]
    assert get(f"{clip_server}/samples/{broken[0]['sample_id']}/media").status_code == 404


def test_a_changed_source_is_refused(clip_store, clip_server):
    row = clips(clip_server)[0]
    source = clip_store / "media" / "cuts.mp4"
    original = source.read_bytes()
    try:
        source.write_bytes(original[:-10] + b"0123456789")
        response = get(f"{clip_server}/samples/{row['sample_id']}/media", format="webm")
        assert response.status_code == 410
        assert "changed since it was ingested" in response.json()["error"]
    finally:
        source.write_bytes(original)


@pytest.fixture(scope="module")
def browser(clip_server):
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def wait_until_playable(page, testid: str) -> None:
    """Wait for the video element to hold a decoded frame (readyState >= 2); on a timeout,
    say what the element had reached, which source it chose and what error it met."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    query = f"document.querySelector('[data-testid={testid}]')"
    try:
        page.wait_for_function(f"() => {{ const v = {query}; return v && v.readyState >= 2; }}",
                               timeout=60_000)
    except PlaywrightTimeout:
        state = page.evaluate(
            f"() => {{ const v = {query}; return v && {{ready: v.readyState, "
            "network: v.networkState, src: v.currentSrc, error: v.error && v.error.code, "
            "mp4: v.canPlayType('video/mp4; codecs=\"avc1.42E01E\"'), "
            "webm: v.canPlayType('video/webm; codecs=\"vp9\"')}}; }}")
        pytest.fail(f"{testid} never became playable: {state}")


def test_the_gallery_plays_clips(browser, clip_server, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    rows = clips(clip_server)
    page.goto(clip_server + "/")
    page.select_option("#f-media", "video_clip")
    page.click("#f-apply")
    page.wait_for_function("() => document.querySelectorAll('#grid [data-testid=card]')"
                           ".length === 3", timeout=60_000)
    # hovering a card plays its clip in place of the poster
    page.hover(f"#grid [data-id='{rows[1]['sample_id']}']")
    wait_until_playable(page, "card-video")
    screenshot(page, tmp_path, "gallery-clips")
    page.goto(f"{clip_server}/#/sample/{rows[1]['sample_id']}")
    wait_until_playable(page, "clip-video")
    played = page.evaluate("() => { const v = document.querySelector("
                           "'[data-testid=clip-video]'); return [v.duration, v.currentSrc]; }")
    span = rows[1]["clip_end_s"] - rows[1]["clip_start_s"]
    assert abs(played[0] - span) <= 0.1 and f"/samples/{rows[1]['sample_id']}/media" in played[1]
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=frames] img')]"
                           ".filter(i => i.complete && i.naturalWidth > 0).length === 5",
                           timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll('#siblings [data-testid=card]')"
                           ".length === 2", timeout=60_000)
    screenshot(page, tmp_path, "gallery-clip")
    context.close()
    assert not errors, errors


def test_the_report_shows_clip_strips(clip_store, tmp_path):
    from curate.config import StoreConfig
    from curate.report import STRIP_AT, write_report

    out = tmp_path / "report.html"
    write_report(StoreConfig(uri=str(clip_store / "store"), table="samples"), out)
    page = out.read_text()
    strips = re.findall(r'<div class="card strip"><img alt="[^"]*" src="data:image/jpeg;'
                        r'base64,([^"]+)"', page)
    assert len(strips) == 3  # the three clips, all kept
    strip = Image.open(io.BytesIO(base64.b64decode(strips[0])))
    assert strip.size == (len(STRIP_AT) * 128, 72)  # four frames of 128 x 72
    assert "clip 0 · 0.00–2.00 s" in page
    assert "not_a_video" in page  # the broken file's group
    assert not re.search(r'(src|href)="(?!data:)', page)
