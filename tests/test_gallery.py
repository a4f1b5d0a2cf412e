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
    # every copy shows its thumbnail (a row with media is never drawn as "no media")
    assert page.eval_on_selector_all("#duplicates [data-testid=card] img",
                                     "imgs => imgs.length") == len(group["members"])
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
    # a row the sampler left out that is no copy of any other row under any clustering:
    # farther than semantic_dedup's eps from every other embedding, than phash_dedup's
    # max_distance from every other pHash (else a rerun's k-means, without the rejected
    # row, may group it with a near copy, and a person's accept yields to a copy kept)
    stored = Store(StoreConfig(uri=str(served[1]))).read(
        ["sample_id", "clip_embedding", "phash"]).to_pylist()
    vectors = {r["sample_id"]: np.asarray(r["clip_embedding"], float) for r in stored
               if r["clip_embedding"] is not None}
    hashes = {r["sample_id"]: r["phash"] for r in stored if r["phash"] is not None}

    def cosine(a, b):
        return 1 - vectors[a] @ vectors[b] / np.linalg.norm(vectors[a]) / np.linalg.norm(
            vectors[b])

    def alone(sample_id):
        return all(cosine(sample_id, i) > 0.01 for i in vectors if i != sample_id) and all(
            (hashes[sample_id] ^ h).bit_count() > 8 for i, h in hashes.items()
            if i != sample_id)

    left = [r["sample_id"] for r in rows
            if (r["reject_reason"] or "").startswith("diversity_sample")]
    left_out = next((i for i in left if alone(i)), left[0])
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
        ["sample_id", "selected", "reject_reason", "review"]).to_pylist()}
    got = ran[left_out]
    if not alone(left_out) and not got["selected"]:
        # the rules: a person's accept yields to a copy kept; it must be a real copy
        stage, _, kept = got["reject_reason"].partition(": ")
        kept = kept.split()[-1]
        assert ran[kept]["selected"] is True, ran[kept]
        # a copy has a near row (the first link of the chain to its kept copy)
        near = ([i for i in vectors if i != left_out and cosine(left_out, i) < 0.01]
                if stage == "semantic_dedup" else
                [i for i, h in hashes.items()
                 if i != left_out and (hashes[left_out] ^ h).bit_count() <= 8])
        assert near, got
    else:
        assert got["selected"] is True, got
    assert (ran[chosen]["selected"], ran[chosen]["reject_reason"]) == (
        False, "review: a watermark")
    # an export of what people accepted: the selected rows whose verdict is accept
    from curate.export import export

    exported = export(StoreConfig(uri=str(store)), {
        "out": str(tmp_path / "accepted"), "format": "parquet", "where": "review = 'accept'"})
    accepted = {i for i, r in ran.items() if r["selected"] and r["review"] == "accept"}
    assert exported.written == exported.reviewed == len(accepted)
    assert (left_out in accepted) == got["selected"]


def badges_are(page, ids: list[str], review: str) -> None:
    """Wait until every card of `ids` shows `review` as its badge ("" for none)."""
    page.wait_for_function(
        """([ids, r]) => !document.querySelector('#error').hidden || ids.every(id =>
             [...document.querySelectorAll(`#grid .card[data-id="${id}"] .verdict`)]
               .every(b => b.className === ('verdict ' + r).trim()))""",
        arg=[ids, review], timeout=60_000)
    assert page.is_hidden("#error"), page.text_content("#error")


def test_queues_and_picks_review_many_samples_by_mouse_and_keys(page, served, tmp_path):
    """A curator opens the review queues: the pHash copies beside their kept copies with
    their distance; on the audit queue picks four cards (click, shift-click) and rejects
    them (key r), accepts another (j to it, x, a), undoes that (u), and reads the accept
    rate; then rejects a whole filtered view of the grid at once. The reviews table holds
    exactly those verdicts, and the estimate is the Wilson interval of what it holds."""
    from scipy.stats import binomtest

    from curate.config import StoreConfig
    from curate.table.store import Store

    listed = api(page, "/queues")["queues"]
    page.goto(page.base + "/#/review")
    page.wait_for_selector("[data-testid=queue]")
    titles = page.eval_on_selector_all("[data-testid=queue]", "as => as.map(a => a.textContent)")
    assert titles == [q["title"] for kind in ("threshold", "disagree", "duplicates", "near",
                                                  "audit")
                      for q in listed if q["kind"] == kind]

    pairs = api(page, "/queues/duplicates:phash_dedup", limit=48)["rows"]
    page.click("a[href='#/queue/duplicates%3Aphash_dedup']")
    page.wait_for_function("n => document.querySelectorAll('[data-testid=pair]').length === n",
                           arg=len(pairs))
    first = page.query_selector("[data-testid=pair]")
    assert [c.get_attribute("data-id") for c in first.query_selector_all(".card")] == [
        pairs[0]["sample_id"], pairs[0]["_kept"]["sample_id"]]
    assert f"distance {pairs[0]['_queue']['distance']:g}" in first.text_content()
    # a range of picks takes the queue's rows (the copies), not the kept copies between
    picks = page.query_selector_all("#grid [data-testid=pair] > .card:first-child .pick")
    picks[0].click()
    picks[2].click(modifiers=["Shift"])
    picked = page.eval_on_selector_all("#grid .card.picked", "cs => cs.map(c => c.dataset.id)")
    assert set(picked) == {p["sample_id"] for p in pairs[:3]}
    page.keyboard.press("Escape")
    assert page.text_content("[data-testid=picked]") == "0 picked"
    # free tags on two copies nobody reviewed: no verdict given, the tags shown
    known = api(page, "/reviews", sample_ids=",".join(p["sample_id"] for p in pairs))["reviews"]
    untouched = [n for n, p in enumerate(pairs) if p["sample_id"] not in known][:2]
    assert untouched
    page.fill("[data-testid=reviewer]", "bo")
    page.fill("[data-testid=tags]", "sky, sky , dog")
    for n in untouched:
        picks[n].click()
    page.click("[data-testid=tag]")
    tagged = [pairs[n]["sample_id"] for n in untouched]
    badges_are(page, tagged, "tagged")
    assert {page.text_content(f"#grid .card[data-id='{i}'] .verdict") for i in tagged} == {
        "tags: sky, dog"}
    latest = api(page, "/reviews", sample_ids=",".join(tagged))["reviews"]
    assert {(v["review"], tuple(v["review_tags"]), v["reviewed_by"])
            for v in latest.values()} == {(None, ("sky", "dog"), "bo")}
    page.keyboard.press("Escape")
    page.fill("[data-testid=tags]", "")
    page.set_viewport_size({"width": 1280, "height": 1400})  # every pair in view
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    screenshot(page, tmp_path, "gallery-queue")
    page.set_viewport_size({"width": 1280, "height": 900})

    audit = api(page, "/queues/audit", seed=5, limit=48)["rows"]
    page.goto(page.base + "/#/queue/audit?seed=5")
    wait_for_count(page, len(audit))
    ids = card_ids(page)
    assert ids == [r["sample_id"] for r in audit]
    before = api(page, "/reviews", sample_ids=",".join(ids))["reviews"]
    page.fill("[data-testid=reviewer]", "ana")
    page.fill("[data-testid=reason]", "soft focus")
    cards = page.query_selector_all("#grid [data-testid=pick]")
    cards[0].click()
    cards[3].click(modifiers=["Shift"])
    assert page.text_content("[data-testid=picked]") == "4 picked"
    page.evaluate("() => document.activeElement.blur()")
    page.keyboard.press("r")
    badges_are(page, ids[:4], "reject")
    page.keyboard.press("Escape")
    # a card past those four that no one reviewed before (an earlier test may have)
    fresh = next(n for n in range(4, len(ids)) if ids[n] not in before)
    for _ in range(fresh + 1):
        page.keyboard.press("j")  # the focus moves from the first card on
    page.keyboard.press("x")
    page.keyboard.press("a")
    badges_are(page, ids[fresh:fresh + 1], "accept")
    page.keyboard.press("u")
    badges_are(page, ids[fresh:fresh + 1], "")
    page.keyboard.press("Escape")
    page.keyboard.press("a")  # nothing picked: the focused card
    badges_are(page, ids[fresh:fresh + 1], "accept")

    store = Store(StoreConfig(uri=str(served[1])))
    history = store.reviews().to_pylist()
    mine = [(r["sample_id"], r["review"], r["review_reason"], r["reviewed_by"])
            for r in history if r["reviewed_by"] == "ana" and r["sample_id"] in ids
            and r["review_reason"] in ("soft focus", None)][-7:]
    assert mine == [*[(i, "reject", "soft focus", "ana") for i in ids[:4]],
                    (ids[fresh], "accept", None, "ana"), (ids[fresh], None, None, "ana"),
                    (ids[fresh], "accept", None, "ana")]
    latest = api(page, "/reviews", sample_ids=",".join(ids))["reviews"]
    given = [v["review"] for v in latest.values()]
    accepted, rejected = given.count("accept"), given.count("reject")
    ci = binomtest(accepted, accepted + rejected).proportion_ci(method="wilson")
    expected = (f"precision {100 * accepted / (accepted + rejected):.1f}% (95%: "
                f"{100 * ci.low:.1f}%–{100 * ci.high:.1f}%)")
    page.wait_for_function("t => document.querySelector('[data-testid=estimate]')"
                           ".textContent.startsWith(t)", arg=expected)

    # the whole filtered view at once: the rows ingest could not read
    page.goto(page.base + "/#/")
    page.wait_for_selector("#grid [data-testid=card]")
    page.select_option("#f-reason", label="ingest_images: not_an_image (3)")
    page.click("#f-apply")
    wait_for_count(page, 3)
    view = card_ids(page)
    page.click("[data-testid=pick-view]")
    assert page.text_content("[data-testid=picked]") == "the whole view (3 rows) picked"
    page.fill("[data-testid=reason]", "not an image")
    page.click("[data-testid=reject]")
    badges_are(page, view, "reject")
    screenshot(page, tmp_path, "gallery-picks")
    last = store.reviews().to_pylist()[-3:]
    assert sorted(r["sample_id"] for r in last) == sorted(view)
    assert {(r["review"], r["review_reason"]) for r in last} == {("reject", "not an image")}


def test_what_if_moves_a_limit_by_field_and_by_drag(page, tmp_path):
    """On the stats page a typed limit and a dragged one (the slider moved by keys) show
    what GET /whatif answers for that value: the counts and the strip of samples."""
    name = "threshold:nsfw_score:nsfw_score:max"
    page.goto(page.base + "/#/stats")
    box = f"[data-testid=whatif][data-queue='{name}']"
    page.wait_for_selector(box)

    def shows(value):
        expected = api(page, f"/whatif/{name}", value=value, strip=12, funnel="true")
        text = (f"{expected['selected']} → {expected['selected_after']} selected before "
                f"dedup and sampling decide again ({expected['leaving']} leave, "
                f"{expected['entering']} enter the row filters)")
        page.wait_for_function(
            "([sel, t]) => document.querySelector(sel + ' [data-testid=whatif-counts]')"
            ".textContent.endsWith(t)", arg=[box, text])
        assert card_ids(page, f"{box} [data-testid=whatif-strip]") == [
            r["sample_id"] for r in expected["leave"] + expected["enter"]]
        texts = page.eval_on_selector_all(f"{box} [data-testid=whatif-funnel] text",
                                          "ts => ts.map(t => t.textContent)")
        assert texts == [t for line in expected["funnel"] for t in (
            line["name"], f"{line['kept']} kept, {line['dropped']} out"
            + (f" (+{line['pending']} not computed yet)" if line.get("pending") else "")
            + (" (decided again)" if line.get("decided_again") else ""))]
        return expected

    page.click(f"{box} [data-testid=whatif-funnel-open]")  # the funnel shown too
    page.fill(f"{box} [data-testid=whatif-value]", "0.02")
    page.press(f"{box} [data-testid=whatif-value]", "Tab")  # a change: the field is left
    typed = shows(0.02)
    page.focus(f"{box} [data-testid=whatif-range]")
    page.keyboard.press("Home")  # dragged all the way down
    low = page.input_value(f"{box} [data-testid=whatif-range]")
    assert page.input_value(f"{box} [data-testid=whatif-value]") == low
    dragged = shows(float(low))
    assert dragged["leaving"] >= typed["leaving"] and dragged["leaving"] > 0  # tighter
    page.locator(box).scroll_into_view_if_needed()
    page.wait_for_function("() => [...document.querySelectorAll("
                           "'[data-testid=whatif-strip] img')].every(i => i.complete)")
    screenshot(page, tmp_path, "gallery-whatif")


def test_apply_runs_the_moved_limit_as_editing_the_config_by_hand_does(page, served,
                                                                        demo_store, tmp_path):
    """Typing a limit and pressing Apply on the stats page runs the moved config on the
    served table; the table it leaves equals the one a hand-edited config's `curate run`
    makes from a copy taken before (people's verdicts included). Last in this module: it
    moves the served table's limit."""
    import pyarrow.compute as pc

    from curate.config import StoreConfig, load_config
    from curate.pipeline import Pipeline
    from curate.table.store import Store

    from .conftest import copy_store, demo_config

    name = "threshold:nsfw_score:nsfw_score:max"
    # the verdicts earlier tests gave, applied first: the what-if projects the funnel of
    # the last run, and a rerun would apply them as well as the moved limit
    Pipeline.from_config(load_config(demo_config(demo_store.parent / "media", served[1],
                                                 executor="local"))).run(progress=False)
    by_hand = copy_store(served[1], tmp_path / "by-hand")
    page.goto(page.base + "/#/stats")
    box = f"[data-testid=whatif][data-queue='{name}']"
    page.wait_for_selector(box)
    assert page.is_disabled(f"{box} [data-testid=whatif-apply]")  # nothing moved yet
    page.fill("[data-testid=apply-reviewer]", "ana")
    page.fill(f"{box} [data-testid=whatif-value]", "0.02")
    page.press(f"{box} [data-testid=whatif-value]", "Tab")
    expected = api(page, f"/whatif/{name}", value=0.02, strip=100, funnel="true")
    page.click(f"{box} [data-testid=whatif-apply]")
    status = "[data-testid=applies] [data-testid=apply-status]"
    page.wait_for_function(
        "s => ['finished', 'failed'].includes(document.querySelector(s)?.textContent)",
        arg=status, timeout=180_000)
    applies = api(page, "/applies")["applies"]
    assert len(applies) == 1 and applies[0]["status"] == "finished", applies[0]["error"]
    assert applies[0]["change"] == {"queue": name, "stage": "nsfw_score",
                                    "param": "max_score", "before": 0.8, "after": 0.02}
    assert applies[0]["by"] == "ana"
    # the page shows the new table: the limit now the applied one
    page.wait_for_function(
        "s => document.querySelector(s)?.textContent === \"at the run's limit 0.02\"",
        arg=f"{box} [data-testid=whatif-counts]")
    screenshot(page, tmp_path, "gallery-apply")
    config = requests.get(f"{page.base}/applies/{applies[0]['apply_id']}/config.yaml",
                          timeout=30)
    assert config.status_code == 200 and "max_score: 0.02" in config.text

    raw = demo_config(demo_store.parent / "media", by_hand, executor="local")
    next(s for s in raw["stages"] if s["type"] == "nsfw_score")["max_score"] = 0.02
    summary = Pipeline.from_config(load_config(raw)).run(progress=False)
    # the what-if's funnel is the run's, line for line, up to the first stage that
    # decides again over the table (after it, that stage's new decisions differ)
    projected = expected["funnel"]
    exact = next(i for i, line in enumerate(projected) if line.get("decided_again"))
    assert exact > [line["name"] for line in projected].index("nsfw_score")
    assert [(p["name"], p["rows_in"], p["kept"], p["dropped"]) for p in projected[:exact]] \
        == [(s.name, s.rows_in, s.kept, s.dropped) for s in summary.stages[:exact]]

    def table(store):
        rows = Store(StoreConfig(uri=str(store))).read()
        return rows.take(pc.sort_indices(rows, [("sample_id", "ascending")]))

    applied, edited = table(served[1]), table(by_hand)
    assert applied.schema == edited.schema
    for column in applied.column_names:
        assert applied[column].equals(edited[column]), column
    assert pc.sum(applied["selected"]).as_py() == applies[0]["selected"]
    # the what-if named the rows the limit drops
    dropped = applied.filter(pc.is_valid(applied["nsfw_reason"]))["sample_id"].to_pylist()
    assert dropped  # the move dropped rows (which were selected varies with the sample ids)
    assert {r["sample_id"] for r in expected["leave"]} <= set(dropped)
    assert expected["leaving"] == len(expected["leave"])
