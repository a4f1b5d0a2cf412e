"""The gallery in a real headless Chromium (Debian's), driven by Playwright, against a real
Serve app on the demo table."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

CHROMIUM = os.environ.get("CURATE_CHROMIUM", "/usr/bin/chromium")
#: The flags a root user in a closed network needs (no sandbox, no background traffic).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser(served):
    from playwright.sync_api import sync_playwright

    if not shutil.which(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium "
                    "(apt-get install chromium), or set CURATE_CHROMIUM")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, served):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.base = served[0]
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def api(page, path, **params):
    response = requests.get(page.base + path, params=params, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def screenshot(page, tmp_path: Path, name: str) -> Path:
    """A full-page PNG (also kept in $CURATE_SCREENSHOTS when set); not blank."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    pixels = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("L"), float)
    assert pixels.shape[0] >= 500 and pixels.std() > 10  # something was drawn
    keep = os.environ.get("CURATE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path


def card_ids(page, within: str = "#grid") -> list[str]:
    return page.eval_on_selector_all(f"{within} [data-testid=card]",
                                     "cards => cards.map(c => c.dataset.id)")


def wait_for_count(page, count: int, within: str = "#grid") -> None:
    page.wait_for_function(
        "([sel, n]) => document.querySelectorAll(sel + ' [data-testid=card]').length === n",
        arg=[within, count], timeout=60_000)


def test_grid_loads_and_scrolls_for_more(page, tmp_path):
    page.set_viewport_size({"width": 1280, "height": 500})  # 12 cards overflow it
    page.goto(page.base + "/?page=12")
    wait_for_count(page, 12)
    for shown in (24, 33):
        page.mouse.wheel(0, 20_000)
        wait_for_count(page, shown)
    assert page.text_content("#count") == "33 of 33 shown"
    expected = [r["sample_id"] for r in api(page, "/samples", limit=100)["rows"]]
    assert card_ids(page) == expected
    # every thumbnail decoded; rows whose file is broken say why instead
    page.wait_for_function("() => [...document.querySelectorAll('#grid img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)",
                           timeout=60_000)
    placeholders = page.eval_on_selector_all("#grid .none", "els => els.map(e => e.textContent)")
    assert any(text.startswith("empty: file has 0 bytes") for text in placeholders)
    assert len(placeholders) == sum(
        1 for r in api(page, "/samples", limit=100, columns="error")["rows"] if r["error"])
    screenshot(page, tmp_path, "gallery-grid")


def test_filters_narrow_the_grid(page, tmp_path):
    page.goto(page.base + "/")
    wait_for_count(page, 33)
    page.select_option("#f-selected", "true")
    page.click("#f-apply")
    wait_for_count(page, 8)
    badges = page.eval_on_selector_all("#grid .badge", "els => els.map(e => e.textContent)")
    assert badges == ["selected"] * 8

    page.select_option("#f-selected", "")
    page.select_option("#f-reason", label="ingest_images: not_an_image (3)")
    page.click("#f-apply")
    wait_for_count(page, 3)

    page.select_option("#f-reason", "")
    page.select_option("#f-score", "blur")
    page.fill("#f-min", "100")
    page.click("#f-apply")
    expected = api(page, "/samples", where="blur >= 100", limit=100)
    wait_for_count(page, expected["total"])
    assert card_ids(page) == [r["sample_id"] for r in expected["rows"]]
    screenshot(page, tmp_path, "gallery-filtered")


def test_text_search_shows_the_api_ranking(page, tmp_path):
    page.goto(page.base + "/")
    wait_for_count(page, 33)
    page.fill("#search", "a cup of coffee")
    page.press("#search", "Enter")
    page.wait_for_selector("h2:has-text('a cup of coffee')")
    expected = api(page, "/search", text="a cup of coffee", k=48)["rows"]
    wait_for_count(page, len(expected))
    got = card_ids(page)
    distances = {r["sample_id"]: r["_distance"] for r in expected}
    # the same rows, in the same order of distance (identical copies may swap)
    assert sorted(got) == sorted(distances)
    assert [distances[i] for i in got] == sorted(distances.values())
    screenshot(page, tmp_path, "gallery-search")


def test_sample_view_shows_columns_duplicates_and_similar(page, tmp_path):
    rows = api(page, "/samples", where="phash_duplicate_of IS NOT NULL", limit=1)["rows"]
    copy = rows[0]["sample_id"]
    page.goto(page.base + "/")
    wait_for_count(page, 33)
    page.click(f"#grid [data-id='{copy}']")
    page.wait_for_selector("[data-testid=sample]")
    page.wait_for_selector("#similar [data-testid=card]")
    columns = page.eval_on_selector_all("[data-testid=columns] tr",
                                        "trs => trs.map(t => t.cells[0].textContent)")
    sample = api(page, f"/samples/{copy}")
    assert columns == list(sample)
    assert page.text_content("[data-testid=columns] tr:first-child td:last-child") == copy
    group = api(page, f"/duplicates/{copy}")
    assert card_ids(page, "#duplicates") == [m["sample_id"] for m in group["members"]]
    similar = api(page, f"/samples/{copy}/similar", k=12)["rows"]
    assert sorted(card_ids(page, "#similar")) == sorted(r["sample_id"] for r in similar)
    page.wait_for_function("() => document.querySelector('img.main').naturalWidth > 0")
    screenshot(page, tmp_path, "gallery-sample")
    # a similar image opens its own view
    other = card_ids(page, "#similar")[0]
    page.click(f"#similar [data-id='{other}']")
    page.wait_for_function("id => location.hash === '#/sample/' + id", arg=other)
    page.wait_for_function(
        "id => document.querySelector('[data-testid=columns] td:last-child')?.textContent"
        " === id", arg=other)


def test_stats_view_draws_the_funnel_and_histograms(page, tmp_path):
    page.goto(page.base + "/#/stats")
    page.wait_for_selector("[data-testid=funnel] svg")
    stats = api(page, "/stats")
    labels = page.eval_on_selector_all("[data-testid=funnel] text",
                                       "ts => ts.map(t => t.textContent)")
    for stage in stats["funnel"]:
        assert stage["name"] in labels
        assert f"{stage['kept']} kept, {stage['dropped']} out" in labels
    charts = page.query_selector_all("[data-testid=histogram]")
    assert len(charts) == len(stats["histograms"])
    bars = page.eval_on_selector_all("[data-testid=histogram] rect", "rs => rs.length")
    assert bars == sum(2 * (len(h["edges"]) - 1) for h in stats["histograms"].values())
    screenshot(page, tmp_path, "gallery-stats")


def verdict_is(page, review: str) -> None:
    """Wait until the sample view shows `review` ("" for none); fail with the page's
    error line if it shows one instead."""
    page.wait_for_function(
        """r => document.querySelector('[data-testid=verdict]')?.dataset.review === r
               || !document.querySelector('#error').hidden""", arg=review, timeout=60_000)
    assert page.is_hidden("#error"), page.text_content("#error")
    assert page.get_attribute("[data-testid=verdict]", "data-review") == review


def test_review_by_mouse_and_keys_then_a_run_honours_it(page, served, demo_store,
                                                        tmp_path):
    """A curator accepts a sample the sampler left out (key a), moves on with j, rejects a
    selected one with a reason (mouse), undoes and rejects again (key r); the verdicts are
    in the reviews table, and a `curate run` on a copy of the table honours them."""
    from curate.config import StoreConfig, load_config
    from curate.pipeline import Pipeline
    from curate.table.store import Store

    from .conftest import copy_store, demo_config

    rows = api(page, "/samples", limit=100, columns="uri,selected,reject_reason")["rows"]
    left_out = next(r["sample_id"] for r in rows
                    if (r["reject_reason"] or "").startswith("diversity_sample"))
    chosen = next(r["sample_id"] for r in rows if r["selected"])
    page.goto(page.base + "/")
    wait_for_count(page, 33)
    ids = card_ids(page)
    page.evaluate("id => { location.hash = '#/sample/' + id; }", left_out)
    verdict_is(page, "")
    page.fill("[data-testid=reviewer]", "ana")
    page.evaluate("() => document.activeElement.blur()")
    page.keyboard.press("a")
    verdict_is(page, "accept")
    assert "by ana" in page.text_content("[data-testid=verdict]")
    page.keyboard.press("j")  # the next card of the grid
    after = ids[ids.index(left_out) + 1]
    page.wait_for_function("id => location.hash === '#/sample/' + id", arg=after)
    page.wait_for_function(
        "id => document.querySelector('[data-testid=columns] td:last-child')?.textContent"
        " === id", arg=after)

    page.evaluate("id => { location.hash = '#/sample/' + id; }", chosen)
    page.wait_for_function(
        "id => document.querySelector('[data-testid=columns] td:last-child')?.textContent"
        " === id", arg=chosen)
    page.fill("[data-testid=reviewer]", "ana")
    page.fill("[data-testid=reason]", "a watermark")
    page.click("[data-testid=reject]")
    verdict_is(page, "reject")
    screenshot(page, tmp_path, "gallery-review")
    page.click("[data-testid=undo]")
    verdict_is(page, "")
    page.evaluate("() => document.activeElement.blur()")
    page.keyboard.press("r")
    verdict_is(page, "reject")

    given = Store(StoreConfig(uri=str(served[1]))).reviews().to_pylist()
    mine = [(r["sample_id"], r["review"], r["review_reason"], r["reviewed_by"])
            for r in given if r["sample_id"] in (left_out, chosen)]
    assert mine == [(left_out, "accept", None, "ana"), (chosen, "reject", "a watermark", "ana"),
                    (chosen, None, None, "ana"), (chosen, "reject", "a watermark", "ana")]

    store = copy_store(served[1], tmp_path / "store")  # the served table stays as it is
    media = demo_store.parent / "media"  # where the demo table's files are
    summary = Pipeline.from_config(load_config(demo_config(media, store, executor="local"))
                                   ).run(progress=False)
    assert summary.stages[-1].name == "review"
    assert summary.stages[-1].report["rejected"] >= 1
    ran = {r["sample_id"]: r for r in Store(StoreConfig(uri=str(store))).read(
        ["sample_id", "selected", "reject_reason"]).to_pylist()}
    assert ran[left_out]["selected"] is True
    assert (ran[chosen]["selected"], ran[chosen]["reject_reason"]) == (
        False, "review: a watermark")
