"""The hosting layer over real HTTP: a real Ray Serve app on a copy of the demo table."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lancedb
import numpy as np
import pyarrow.compute as pc
import pytest
import requests
from PIL import Image

from .conftest import free_port

pytestmark = pytest.mark.usefixtures("served")


@pytest.fixture(scope="module")
def base(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def table(served):
    return lancedb.connect(str(served[1])).open_table("samples")


def rows_by_name(table) -> dict[str, dict]:
    return {r["uri"].split("/media/")[-1]: r for r in table.to_arrow().to_pylist()}


def get(base, path, **params):
    return requests.get(base + path, params=params, timeout=120)


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]


# --- reads ---------------------------------------------------------------------------------


def test_health_and_openapi_list_every_route(base):
    assert get(base, "/health").json()["status"] == "ok"
    paths = set(get(base, "/openapi.json").json()["paths"])
    assert {"/health", "/samples", "/samples/{sample_id}", "/samples/{sample_id}/media",
            "/samples/{sample_id}/thumbnail", "/samples/{sample_id}/similar", "/search",
            "/search/image", "/duplicates/{sample_id}", "/stats", "/features",
            "/features/{request_id}", "/reviews", "/samples/{sample_id}/reviews",
            "/reviews/undo", "/queues", "/queues/{name}", "/whatif/{name}", "/applies",
            "/applies/{apply_id}", "/applies/{apply_id}/config.yaml"} <= paths


def test_samples_pages_filters_and_orders(base, table):
    data = table.to_arrow()
    first = get(base, "/samples", limit=20).json()
    second = get(base, "/samples", limit=20, offset=20).json()
    assert first["total"] == data.num_rows == 33
    ids = [r["sample_id"] for r in first["rows"] + second["rows"]]
    assert sorted(ids) == sorted(data["sample_id"].to_pylist())
    assert "clip_embedding" not in first["rows"][0]  # vectors only when asked

    kept = get(base, "/samples", selected="true", limit=100).json()
    assert kept["total"] == pc.sum(data["selected"]).as_py() == 8
    assert all(r["selected"] for r in kept["rows"])

    wide = get(base, "/samples", where="width >= 512 AND format = 'JPEG'",
               columns="uri,width").json()
    expected = sum(1 for r in data.to_pylist() if (r["width"] or 0) >= 512
                   and r["format"] == "JPEG")
    assert wide["total"] == expected > 0
    assert set(wide["rows"][0]) == {"sample_id", "uri", "width"}

    ordered = get(base, "/samples", order_by="aesthetic_score desc", selected="true",
                  columns="aesthetic_score").json()["rows"]
    scores = [r["aesthetic_score"] for r in ordered]
    assert scores == sorted(scores, reverse=True) and len(scores) == 8
    with_vectors = get(base, "/samples", limit=1, vectors="true", selected="true").json()
    assert len(with_vectors["rows"][0]["clip_embedding"]) == 32


@pytest.mark.parametrize(("params", "says"), [
    ({"where": "nope = 1"}, "unknown column 'nope'"),
    ({"where": "width > "}, "bad where filter"),
    ({"where": "width > 'wide'"}, "bad where filter"),
    ({"where": "width > 1; DROP TABLE samples"}, "';' is not allowed"),
    ({"where": "uri = 'unterminated"}, "unterminated quote"),
    ({"where": "width > 1 OR " * 200 + "true"}, "the limit is 1000"),
    ({"where": "`sample_id` = 'a' OR \"secret\" = 1"}, "unknown column 'secret'"),
    ({"order_by": "width sideways"}, "order_by"),
    ({"order_by": "clip_embedding"}, "order_by"),
    ({"columns": "uri,password"}, "unknown columns password"),
    ({"limit": "5000"}, "limits.max_page"),
    ({"limit": "abc"}, "limit"),
    ({"offset": "-1"}, "offset"),
    ({"selected": "maybe"}, "selected"),
])
def test_bad_queries_get_400_with_the_reason(base, params, says):
    assert says in error_of(get(base, "/samples", **params), 400)


def test_one_sample_and_unknown_ids(base, table):
    row = rows_by_name(table)["photos/flower.jpg"]
    got = get(base, f"/samples/{row['sample_id']}").json()
    assert got["uri"] == row["uri"] and got["content_hash"] == row["content_hash"]
    assert "clip_embedding" not in got and "aesthetic_score" in got
    vectors = get(base, f"/samples/{row['sample_id']}", vectors="true").json()
    assert np.allclose(vectors["clip_embedding"], row["clip_embedding"], atol=1e-6)
    assert "no sample" in error_of(get(base, "/samples/" + "0" * 32), 404)
    assert error_of(get(base, "/samples/NOT-AN-ID"), 404)


def test_media_serves_exactly_the_row_file(base, table):
    rows = rows_by_name(table)
    flower = rows["photos/flower.jpg"]
    response = get(base, f"/samples/{flower['sample_id']}/media")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == Path(flower["uri"]).read_bytes()
    png = rows["odd/really_a_png.jpg"]  # named .jpg, sniffed as PNG
    assert get(base, f"/samples/{png['sample_id']}/media").headers["content-type"] == \
        "image/png"
    # a tar member: the member's bytes, read at its offset in the shard
    member = next(r for name, r in rows.items() if ".tar#" in name and r["content_hash"])
    shard, _, name = member["uri"].partition("#")
    with tarfile.open(shard) as tar:
        expected = tar.extractfile(name).read()
    assert get(base, f"/samples/{member['sample_id']}/media").content == expected
    # a row whose file never decoded has no media, and says why
    empty = rows["broken/empty.jpg"]
    assert "no media: empty" in error_of(get(base, f"/samples/{empty['sample_id']}/media"),
                                         404)


def test_media_refuses_traversal_and_files_changed_under_the_row(base, table, tmp_path):
    for attempt in ("../../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd",
                    "....//....//etc/passwd"):
        response = requests.get(f"{base}/samples/{attempt}/media", timeout=30)
        assert response.status_code == 404, (attempt, response.text)
        assert b"root:" not in response.content
    # the file a row references is swapped for a symlink to another file: refused
    row = rows_by_name(table)["photos/coffee.jpg"]
    path = Path(row["uri"])
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for the web" * 100)
    backup = path.read_bytes()
    path.unlink()
    path.symlink_to(secret)
    try:
        for route in ("media", "thumbnail"):
            reason = error_of(get(base, f"/samples/{row['sample_id']}/{route}"), 410)
            assert "changed since it was ingested" in reason
    finally:
        path.unlink()
        path.write_bytes(backup)
    assert get(base, f"/samples/{row['sample_id']}/media").content == backup


def test_thumbnails_are_small_jpegs(base, table):
    row = rows_by_name(table)["photos/astronaut.jpg"]
    for size in (64, 300):
        response = get(base, f"/samples/{row['sample_id']}/thumbnail", size=size)
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "JPEG" and max(image.size) == size
    assert "size" in error_of(get(base, f"/samples/{row['sample_id']}/thumbnail", size=5), 400)


def assert_nearest(table, rows: list[dict], vector: np.ndarray, k: int,
                   exclude: str | None = None) -> None:
    """`rows` are the exact cosine top k (ties, like identical copies, in any order)."""
    data = table.to_arrow().to_pylist()
    truth = {r["sample_id"]: 1 - float(np.dot(vector, r["clip_embedding"])) for r in data
             if r["clip_embedding"] is not None and r["sample_id"] != exclude}
    assert len(rows) == k
    for row in rows:
        assert row["_distance"] == pytest.approx(truth[row["sample_id"]], abs=1e-5)
    expected = sorted(truth.values())[:k]
    assert [r["_distance"] for r in rows] == pytest.approx(expected, abs=1e-5)


def test_similar_is_the_exact_cosine_top_k(base, table):
    row = rows_by_name(table)["photos/rocket.jpg"]
    got = get(base, f"/samples/{row['sample_id']}/similar", k=5).json()["rows"]
    assert_nearest(table, got, np.asarray(row["clip_embedding"]), 5, exclude=row["sample_id"])
    distances = [r["_distance"] for r in got]
    assert distances == sorted(distances)
    broken = rows_by_name(table)["broken/empty.jpg"]
    assert "no clip_embedding" in error_of(get(base, f"/samples/{broken['sample_id']}/similar"),
                                           404)


def test_duplicates_group_the_kept_copy_and_its_copies(base, table):
    data = table.to_arrow().to_pylist()
    parent = {r["sample_id"]: r["duplicate_of"] for r in data if r["duplicate_of"]}

    def root_of(sample_id):
        while sample_id in parent:
            sample_id = parent[sample_id]
        return sample_id

    assert any(r["phash_duplicate_of"] for r in data) and any(r["exact_duplicate_of"]
                                                            for r in data)
    for copy in parent:  # every copy (copies of a dropped copy: test_catalog makes one)
        kept = root_of(copy)
        group = get(base, f"/duplicates/{copy}").json()
        members = [m["sample_id"] for m in group["members"]]
        assert group["kept"] == kept and members[0] == kept
        expected = {r["sample_id"] for r in data if root_of(r["sample_id"]) == kept}
        assert set(members) == expected and copy in members and len(members) >= 2
        assert group["members"][0]["via"] is None
        assert {m["via"] for m in group["members"][1:]} <= {"exact", "phash", "semantic"}
        for member in group["members"][1:]:  # each points at a member by the column it names
            assert member[f"{member['via']}_duplicate_of"] in members
    assert error_of(get(base, "/duplicates/" + "f" * 32), 404)


def test_stats_count_what_the_table_holds(base, table):
    stats = get(base, "/stats").json()
    data = table.to_arrow().to_pylist()
    assert stats["rows"] == 33 and stats["selected"] == 8
    assert sum(stats["rejected_by_stage"].values()) == 25
    assert stats["rejected_by_stage"]["ingest_images"] == sum(1 for r in data if r["error"])
    assert [s["name"] for s in stats["funnel"]][:2] == ["ingest_images", "image_quality"]
    blur = stats["histograms"]["blur"]
    assert sum(blur["selected"]) + sum(blur["rejected"]) == blur["count"] == sum(
        1 for r in data if r["blur"] is not None)
    clusters = stats["clusters"]["diversity_cluster"]
    assert sum(c["selected"] for c in clusters) == 8


# --- search --------------------------------------------------------------------------------


def test_text_search_uses_the_clip_text_tower_and_the_index(base, table, served):
    from curate.models.embedders import load_embedder

    from .conftest import tiny_models

    got = get(base, "/search", text="a rocket on the launch pad", k=6).json()["rows"]
    embedder = load_embedder("transformers", str(tiny_models() / "tiny-clip"))
    query = embedder.embed_texts(["a rocket on the launch pad"])[0]
    assert_nearest(table, got, query, 6)
    # the index was built (index_min_rows 10 in tests) and covers every vector
    deadline = time.time() + 60
    while "index" not in get(base, "/health").json()["vector_index"] and time.time() < deadline:
        time.sleep(1)
    indices = lancedb.connect(str(served[1])).open_table("samples").list_indices()
    assert any("clip_embedding" in ix.columns for ix in indices)
    assert "text" in error_of(get(base, "/search", text=""), 400)


def test_image_search_finds_the_uploaded_photo(base, table):
    row = rows_by_name(table)["photos/coffee.jpg"]
    upload = Path(row["uri"]).read_bytes()
    got = requests.post(base + "/search/image", files={"file": ("q.jpg", upload)},
                        params={"k": 3}, timeout=120).json()["rows"]
    # the photo, or a copy of it (the tar shard holds one): equal vectors tie in any order
    exact = [g["sample_id"] for g in got if g["_distance"] < 1e-4]
    assert got[0]["_distance"] < 1e-4 and row["sample_id"] in exact
    broken = requests.post(base + "/search/image", files={"file": ("q.jpg", upload[:2000])},
                           timeout=120)
    assert "truncated" in error_of(broken, 422)


# --- features ------------------------------------------------------------------------------


def post_features(base, mode="sync", **fields):
    files = {"file": ("upload.jpg", fields.pop("file"))} if "file" in fields else None
    return requests.post(base + "/features", data=fields, files=files,
                         params={"mode": mode}, timeout=180)


def test_features_of_an_upload_match_the_table_and_are_cached(base, table, served):
    row = rows_by_name(table)["photos/flower.jpg"]
    image = Path(row["uri"]).read_bytes()
    # the same pixels as another file: a new image to the server
    copy = io.BytesIO()
    Image.open(io.BytesIO(image)).save(copy, "PNG")
    first = post_features(base, file=copy.getvalue(),
                          features="clip_embedding,aesthetic_score,nsfw_score,blur").json()
    assert first["in_table"] is False and sorted(first["computed"]) == sorted(
        ["clip_embedding", "aesthetic_score", "nsfw_score", "blur"])
    values = first["features"]
    # same decoder, same stages, same models: the table's values (JPEG and PNG decode alike)
    assert np.allclose(values["clip_embedding"], row["clip_embedding"], atol=1e-5)
    assert values["aesthetic_score"] == pytest.approx(row["aesthetic_score"], abs=1e-5)
    assert values["nsfw_score"] == pytest.approx(row["nsfw_score"], abs=1e-5)
    assert values["blur"] == pytest.approx(row["blur"], rel=1e-5)
    again = post_features(base, file=copy.getvalue(), features="aesthetic_score").json()
    assert again["cached"] == ["aesthetic_score"] and again["computed"] == []
    side = lancedb.connect(str(served[1])).open_table("samples_features").to_arrow()
    assert first["sample_id"] in side["sample_id"].to_pylist()


def test_features_fill_a_row_of_the_table(base, table, served):
    row = rows_by_name(table)["photos/astronaut.jpg"]
    table.update(where=f"sample_id = '{row['sample_id']}'", values={"aesthetic_score": None})
    got = post_features(base, sample_id=row["sample_id"],
                        features="aesthetic_score,blur").json()
    assert got["in_table"] is True and got["computed"] == ["aesthetic_score"]
    assert got["cached"] == ["blur"] and got["features"]["blur"] == row["blur"]
    assert got["features"]["aesthetic_score"] == pytest.approx(row["aesthetic_score"],
                                                               abs=1e-5)
    fresh = lancedb.connect(str(served[1])).open_table("samples")
    stored = fresh.search().where(f"sample_id = '{row['sample_id']}'").to_arrow()
    assert stored["aesthetic_score"][0].as_py() == got["features"]["aesthetic_score"]
    by_uri = post_features(base, uri=row["uri"], features="aesthetic_score").json()
    assert by_uri["sample_id"] == row["sample_id"] and by_uri["cached"] == ["aesthetic_score"]


def test_feature_errors_are_clear(base, table, served):
    row = rows_by_name(table)["photos/flower.jpg"]
    assert "not_an_image" in error_of(post_features(base, file=b"plain text, no image"), 422)
    truncated = Path(row["uri"]).read_bytes()[:3000]
    assert "truncated" in error_of(post_features(base, file=truncated), 422)
    assert "unknown features caption" in error_of(
        post_features(base, sample_id=row["sample_id"], features="caption"), 400)
    assert "exactly one of" in error_of(post_features(base), 400)
    assert "exactly one of" in error_of(
        post_features(base, sample_id=row["sample_id"], uri=row["uri"]), 400)
    assert "not a row of the table" in error_of(post_features(base, uri="/etc/passwd"), 400)
    assert "no sample" in error_of(post_features(base, sample_id="0" * 32), 404)
    big = b"\xff\xd8\xff" + os.urandom(20_100_000)
    assert "limit" in error_of(post_features(base, file=big), 413)
    assert "empty" in error_of(post_features(base, file=b""), 400)
    assert "mode" in error_of(post_features(base, mode="later", sample_id=row["sample_id"]),
                              400)


def test_async_features_queue_and_answer_later(base, table):
    row = rows_by_name(table)["photos/coffee.jpg"]
    image = Image.open(io.BytesIO(Path(row["uri"]).read_bytes())).rotate(90, expand=True)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    accepted = post_features(base, mode="async", file=buffer.getvalue(),
                             features="clip_embedding,nsfw_score")
    assert accepted.status_code == 202
    request_id = accepted.json()["request_id"]
    deadline = time.time() + 120
    while True:
        job = get(base, f"/features/{request_id}").json()
        if job["status"] != "pending" or time.time() > deadline:
            break
        time.sleep(0.2)
    assert job["status"] == "done", job
    sync = post_features(base, file=buffer.getvalue(), features="clip_embedding,nsfw_score")
    assert sync.json()["features"] == job["result"]["features"]
    assert "no feature request" in error_of(get(base, "/features/" + "a" * 32), 404)
    failed = post_features(base, mode="async", file=b"\x89PNG\r\n\x1a\nbroken")
    time.sleep(0.5)
    for _ in range(100):
        job = get(base, f"/features/{failed.json()['request_id']}").json()
        if job["status"] != "pending":
            break
        time.sleep(0.2)
    assert job["status"] == "failed" and "corrupt" in job["result"]["error"]


# --- people's verdicts ---------------------------------------------------------------------


def post_review(base, reviewer: str | None = "ana", **body):
    headers = {"X-Curate-Reviewer": reviewer} if reviewer else {}
    return requests.post(base + "/reviews", json=body, headers=headers, timeout=60)


def test_reviews_are_recorded_beside_the_table_even_while_a_run_holds_it(base, table,
                                                                          served):
    """A verdict lands in the reviews table, never in the samples table, so a run holding
    the table's lease neither blocks it nor sees its table change under it."""
    from curate.config import StoreConfig
    from curate.table.lease import RunLease
    from curate.table.store import Store

    store = Store(StoreConfig(uri=str(served[1])))
    ids = sorted(table.to_arrow()["sample_id"].to_pylist())[:2]
    version = store.version()
    with RunLease(store, "run-in-progress"):
        answer = post_review(base, sample_ids=ids, review="reject", reason="a watermark",
                             tags=["logo"])
        assert answer.status_code == 200, answer.text
        assert answer.json()["recorded"] == 2
        assert store.version() == version  # the samples table untouched
    post_review(base, reviewer="bo", sample_ids=ids[:1], review="clear")
    history = get(base, f"/samples/{ids[0]}/reviews").json()["reviews"]
    assert [(r["review"], r["reviewed_by"], r["review_reason"]) for r in history][-2:] == [
        ("reject", "ana", "a watermark"), (None, "bo", None)]
    given = store.reviews().to_pylist()[-3:]
    assert [(r["sample_id"], r["review"], r["review_tags"]) for r in given] == [
        (ids[0], "reject", ["logo"]), (ids[1], "reject", ["logo"]), (ids[0], None, None)]


@pytest.mark.parametrize("body, reviewer, status, says", [
    ({"sample_ids": ["0" * 32], "review": "accept"}, "ana", 404,
     "1 of the sample_ids are not in samples: '00000000000000000000000000000000'"),
    ({"sample_ids": ["../etc"], "review": "accept"}, "ana", 404, "not in samples"),
    ({"sample_ids": ["{id}"], "review": "reject"}, "ana", 422, "a reject needs a reason"),
    ({"sample_ids": ["{id}"], "review": "reject", "reason": "a\nb"}, "ana", 422,
     "one line"),
    ({"sample_ids": ["{id}"], "review": "keep"}, "ana", 422, "accept, reject, tag or clear"),
    ({"sample_ids": ["{id}"], "review": "accept"}, None, 422, "reviewer's name is missing"),
    ({"sample_ids": [], "review": "accept"}, "ana", 400, "sample_ids"),
    ({"sample_ids": ["{id}"], "review": "accept", "score": 3}, "ana", 400, "score"),
])
def test_bad_verdicts_get_a_4xx_with_the_reason(base, table, body, reviewer, status, says):
    some = table.to_arrow()["sample_id"][0].as_py()
    body = {k: [i.replace("{id}", some) for i in v] if k == "sample_ids" else v
            for k, v in body.items()}
    assert says in error_of(post_review(base, reviewer, **body), status)


def test_review_queues_page_as_one_long_page_in_brute_force_order(base, table, served):
    """Each queue the demo table offers pages consistently; a limit's queue is the whole
    table sorted by distance to the limit (in plain Python); a copy comes with its kept
    copy."""
    listed = {q["name"]: q for q in get(base, "/queues").json()["queues"]}
    assert {"threshold:nsfw_score:nsfw_score:max", "threshold:image_quality:blur:min",
            "duplicates:phash_dedup", "duplicates:semantic_dedup", "audit",
            "disagree:aesthetic_score:nsfw_score"} <= set(listed)
    for name in listed:
        whole = get(base, f"/queues/{name}", limit=40, columns="uri,selected").json()
        paged = []
        for offset in range(0, 40, 6):
            page = get(base, f"/queues/{name}", offset=offset, limit=6,
                       columns="uri,selected").json()
            paged += page["rows"]
            if not page["more"]:
                break
        assert [r["sample_id"] for r in paged] == [r["sample_id"] for r in whole["rows"]]
        assert all("_queue" in r for r in whole["rows"]) and whole["rows"], name
    rows = table.to_arrow().to_pylist()
    nsfw = get(base, "/queues/threshold:nsfw_score:nsfw_score:max", limit=40).json()["rows"]
    expected = sorted((abs(r["nsfw_score"] - 0.8), r["sample_id"]) for r in rows
                      if r["nsfw_score"] is not None)
    assert [r["sample_id"] for r in nsfw] == [i for _, i in expected]
    by_id = {r["sample_id"]: r for r in rows}
    for pair in get(base, "/queues/duplicates:phash_dedup").json()["rows"]:
        assert pair["_kept"]["sample_id"] == pair["_queue"]["kept"] == \
            by_id[pair["sample_id"]]["phash_duplicate_of"]
        plain = (by_id[pair["sample_id"]]["phash"] ^ by_id[pair["_kept"]["sample_id"]]["phash"])
        assert pair["_queue"]["distance"] <= plain.bit_count()  # orientations only help
    # the run indexed the scores the queues scan by range
    import lance
    indexed = {c for ix in lance.dataset(str(served[1] / "samples.lance")).describe_indices()
               for c in ix.field_names}
    scanned = {c for q in listed.values() if q["kind"] in ("threshold", "disagree")
               for c in (q["column"], q.get("other")) if c}
    assert scanned and scanned <= indexed
    assert "queues: threshold:" in error_of(get(base, "/queues/nope"), 404)
    assert "paged to 2000 rows deep" in error_of(
        get(base, "/queues/audit", offset=1990, limit=20), 400)


def test_what_if_answers_over_http_and_refuses_what_it_cannot_move(base):
    name = "threshold:nsfw_score:nsfw_score:max"
    answer = get(base, f"/whatif/{name}", value=0.02, strip=3, columns="uri").json()
    assert answer["limit"] == 0.8 and answer["value"] == 0.02
    assert answer["selected_after"] == answer["selected"] - answer["leaving"] + \
        answer["entering"]
    assert len(answer["leave"]) == min(3, answer["leaving"])
    assert all(set(r) == {"sample_id", "uri"} for r in answer["leave"])
    assert "funnel" not in answer  # asked for apart: it reads the band's reasons too
    funnel = get(base, f"/whatif/{name}", value=0.02, strip=0, funnel="true").json()["funnel"]
    stats = get(base, "/stats").json()["funnel"]
    assert [line["name"] for line in funnel] == [line["name"] for line in stats]
    nsfw = next(i for i, line in enumerate(stats) if line["name"] == "nsfw_score")
    assert funnel[:nsfw] == [{k: line[k] for k in ("name", "rows_in", "kept", "dropped")}
                             for line in stats[:nsfw]]  # the stages before it: as they were
    line = funnel[nsfw]  # every row it drops now that passed it: the selected ones too
    assert line["dropped"] >= stats[nsfw]["dropped"] + answer["leaving"]
    assert line["kept"] + line["dropped"] == line["rows_in"] == stats[nsfw]["rows_in"]
    assert "no threshold queue 'audit'" in error_of(get(base, "/whatif/audit", value=1), 404)
    assert "not a finite number" in error_of(get(base, f"/whatif/{name}", value="nan"), 400)


@pytest.mark.parametrize("body, reviewer, status, says", [
    ({"queue": "threshold:nsfw_score:nsfw_score:max", "value": 0.02}, None, 422,
     "reviewer's name is missing"),
    ({"queue": "threshold:nope:x:max", "value": 1}, "ana", 404, "no threshold queue"),
    ({"queue": "audit", "value": 1}, "ana", 404, "no threshold queue 'audit'"),
    ({"queue": "threshold:nsfw_score:nsfw_score:max", "value": 0.8}, "ana", 400,
     "nsfw_score.max_score is 0.8 already"),
    ({"queue": "threshold:image_quality:aspect_ratio:min", "value": -3}, "ana", 400,
     "image_quality.min_aspect_ratio = -3.0 makes the config invalid: "
     "stages.1.min_aspect_ratio: Input should be greater than 0"),
    ({"queue": "threshold:nsfw_score:nsfw_score:max"}, "ana", 400, "value: Field required"),
    ({"queue": "threshold:nsfw_score:nsfw_score:max", "value": 0.1, "why": 1}, "ana", 400,
     "why"),
])
def test_apply_refuses_what_it_cannot_run_and_records_nothing(base, body, reviewer, status,
                                                              says):
    headers = {"X-Curate-Reviewer": reviewer} if reviewer else {}
    answer = requests.post(base + "/applies", json=body, headers=headers, timeout=60)
    assert says in error_of(answer, status)
    assert get(base, "/applies").json() == {"applies": []}


def test_apply_waits_for_no_run_it_would_race(base, served):
    """While a run holds the table's lease, an apply is refused with the holder named, and
    nothing is recorded or started."""
    from curate.config import StoreConfig
    from curate.table.lease import RunLease
    from curate.table.store import Store

    store = Store(StoreConfig(uri=str(served[1])))
    version = store.version()
    with RunLease(store, "run-in-progress"):
        answer = requests.post(base + "/applies", headers={"X-Curate-Reviewer": "ana"},
                               json={"queue": "threshold:nsfw_score:nsfw_score:max",
                                     "value": 0.5}, timeout=60)
        says = error_of(answer, 409)
        assert says.startswith("the table is busy: run run-in-progress on host ")
        assert says.endswith("holds it; apply again when it has ended")
    assert get(base, "/applies").json() == {"applies": []}
    assert store.version() == version
    assert "no apply 'apply-0'" in error_of(get(base, "/applies/apply-0"), 404)


def test_an_apply_running_elsewhere_is_waited_for_and_a_lost_one_is_said(base, served):
    """An apply another front replica runs (its record says `running`, its process lives)
    refuses a second one with 409 naming it; once its process is gone without an end
    recorded (the server stopped), it reads `lost`."""
    import subprocess

    from curate.config import StoreConfig
    from curate.table.layout import now
    from curate.table.lease import process_identity
    from curate.table.store import Store

    store = Store(StoreConfig(uri=str(served[1])))
    sleeper = subprocess.Popen(["sleep", "600"])
    record = {"run_id": "apply-elsewhere", "kind": "apply", "pipeline": "demo",
              "status": "running", "started_at": now(),
              "stages_json": {"change": {"stage": "nsfw_score"}, "by": "bo",
                              "process": process_identity(sleeper.pid)}}
    store.save_run(record)
    body = {"queue": "threshold:nsfw_score:nsfw_score:max", "value": 0.5}
    try:
        answer = requests.post(base + "/applies", json=body,
                               headers={"X-Curate-Reviewer": "ana"}, timeout=60)
        assert error_of(answer, 409) == ("apply apply-elsewhere is still running; wait for "
                                         "its end (GET /applies/apply-elsewhere)")
        assert get(base, "/applies/apply-elsewhere").json()["status"] == "running"
    finally:
        sleeper.kill()
        sleeper.wait()
    lost = get(base, "/applies/apply-elsewhere").json()
    assert lost["status"] == "lost" and "the server stopped while it ran" in lost["error"]
    assert [a["apply_id"] for a in get(base, "/applies").json()["applies"]] == [
        "apply-elsewhere"]
    record.update(status="failed", error="a test's record")  # out of the later tests' way
    store.save_run(record)


def latest_of(base, ids):
    return get(base, "/reviews", sample_ids=",".join(ids)).json()["reviews"]


def test_a_whole_view_is_reviewed_at_once_and_undone(base, table):
    rows = table.to_arrow().to_pylist()
    copies = sorted(r["sample_id"] for r in rows if r["phash_duplicate_of"] is not None)
    before = latest_of(base, copies)
    answer = post_review(base, where="phash_duplicate_of IS NOT NULL", review="accept",
                         tags=["pair"])
    assert answer.status_code == 200, answer.text
    assert answer.json()["recorded"] == len(copies) > 1
    now = latest_of(base, copies)
    assert sorted(now) == copies
    assert {(v["review"], v["reviewed_by"], tuple(v["review_tags"])) for v in now.values()} \
        == {("accept", "ana", ("pair",))}
    undone = requests.post(base + "/reviews/undo", json={"sample_ids": copies},
                           headers={"X-Curate-Reviewer": "bo"}, timeout=60)
    assert undone.json()["undone"] == len(copies)
    after = latest_of(base, copies)
    assert {i: v["review"] for i, v in after.items()} == \
        {i: v["review"] for i, v in before.items()}
    some = copies[0]
    for body, status, says in [
        ({"sample_ids": [some], "where": "selected", "review": "accept"}, 400, "not both"),
        ({"review": "accept"}, 400, "give sample_ids, or a view"),
        ({"where": "uri = 'nowhere'", "review": "accept"}, 404, "holds no rows"),
        ({"where": "no_such_column > 1", "review": "accept"}, 400, "no_such_column"),
    ]:
        assert says in error_of(post_review(base, **body), status)
    assert "give sample_ids" in error_of(get(base, "/reviews", sample_ids=""), 400)


def test_the_audit_estimates_precision_from_peoples_verdicts(base):
    from scipy.stats import binomtest

    audit = get(base, "/queues/audit", limit=50, seed=3).json()
    ids = [r["sample_id"] for r in audit["rows"]]
    assert all(r["selected"] for r in audit["rows"]) and audit["estimate"]["sample"] == len(ids)
    assert post_review(base, sample_ids=ids[:3], review="accept").status_code == 200
    assert post_review(base, sample_ids=ids[3:4], review="reject",
                       reason="text overlay").status_code == 200
    estimate = get(base, "/queues/audit", limit=1, seed=3).json()["estimate"]
    given = [v["review"] for v in latest_of(base, ids).values()]
    accepted, rejected = given.count("accept"), given.count("reject")
    assert (estimate["accepted"], estimate["rejected"]) == (accepted, rejected)
    assert accepted >= 3 and rejected >= 1
    ci = binomtest(accepted, accepted + rejected).proportion_ci(method="wilson")
    assert estimate["interval_95"] == pytest.approx([ci.low, ci.high])
    assert estimate["precision"] == pytest.approx(accepted / (accepted + rejected))


# --- curate serve: token, rate limit, binding ----------------------------------------------


def _curate_serve(spawn, store, port: int, *options: str):
    """`curate serve` as a shell runs a background job: SIGINT ignored (POSIX shells do
    that for `cmd &`), in a process group of its own; its own local Ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    process = spawn(
        [sys.executable, "-m", "curate", "serve", "--store", str(store), "--port", str(port),
         "--set", "default_model.autoscaling.min_replicas=0", "--set", "ingress.cpus=0.2",
         "--set", "default_model.cpus=0.2", *options],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 180
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                # the app answers a moment before `curate serve` hears it is ready and
                # says where: a signal before that line would stop it mid-start
                process.head = _output_until(process, "Ctrl-C stops.")
                return process
        except requests.RequestException:  # not listening or not ready yet
            time.sleep(1)
    pytest.fail("curate serve did not answer within 180 s")


def _output_until(process, text: str, seconds: float = 120) -> str:
    """What `process` printed up to the line holding `text` (read here; the rest is left
    to `communicate`)."""
    import threading

    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if text in line:
                seen.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not seen.wait(seconds):
        pytest.fail(f"curate serve did not print {text!r} within {seconds:.0f} s: "
                    + "".join(lines)[-3000:])
    return "".join(lines)


def _ray_session(family) -> tuple[str, list[int]]:
    """The Ray session a process tree runs (its directory, named on the command lines of
    the GCS and the raylet), and the pids of the workers it logged."""
    import re

    import psutil

    sessions = set()
    for member in family:
        try:
            sessions |= set(re.findall(r"(/\S*?/session_[\w.-]+)", " ".join(member.cmdline())))
        except psutil.Error:
            pass
    assert len(sessions) == 1, sessions
    session = sessions.pop()
    logs = Path(session) / "logs"
    workers = [int(log.stem.rsplit("_", 1)[1]) for log in logs.glob("python-core-worker-*.log")]
    return session, workers


def _stop_and_check(spawn, process, sig) -> str:
    """Stop `curate serve` as a terminal's Ctrl-C does (SIGINT to the job's process group)
    or a supervisor does (SIGTERM to the process); then no process of its group, none it
    started and none of its Ray session is left. Returns its output."""
    import psutil

    from .conftest import family_of, still_running

    family = spawn.family(process)
    session, worker_pids = _ray_session(family)
    names = " ".join(" ".join(p.cmdline()) for p in family if p.is_running())
    assert "raylet" in names and "ray::ServeReplica" in names  # a whole Ray of its own
    started = time.time()
    if sig == signal.SIGINT:
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    output = getattr(process, "head", "") + process.communicate(timeout=120)[0]

    session_processes = []
    for candidate in psutil.process_iter():
        try:
            if session in " ".join(candidate.cmdline()) or (
                    candidate.pid in worker_pids and candidate.create_time() < started):
                session_processes.append(candidate)
        except psutil.Error:
            pass
    left = still_running([*family, *family_of(process.pid), *session_processes])
    assert not left, (left, output[-3000:])
    return output


def test_curate_serve_cli_with_token_and_rate_limit(served, spawn, tmp_path):
    """`curate serve` as a user runs it: its own Ray, token mode, a low rate limit; started
    with SIGINT ignored, Ctrl-C still stops it and everything it started."""
    from .conftest import copy_store

    store = copy_store(served[1], tmp_path / "store")
    port = free_port()
    token = "s3cret-token-for-tests"
    process = _curate_serve(spawn, store, port, "--token", token,
                            "--set", "limits.requests_per_second=2",
                            "--set", "limits.burst=5")
    base = f"http://127.0.0.1:{port}"
    header = {"Authorization": f"Bearer {token}"}
    assert requests.get(base + "/samples", timeout=30).status_code == 401
    assert requests.get(base + "/openapi.json", timeout=30).status_code == 401
    wrong = requests.get(base + "/samples", headers={"Authorization": "Bearer nope"},
                         timeout=30)
    assert wrong.status_code == 401 and "token" in wrong.json()["error"]
    assert requests.get(base + "/", timeout=30).status_code == 200  # the page shell
    statuses = [requests.get(base + "/samples", headers=header, params={"limit": 1},
                             timeout=30).status_code for _ in range(12)]
    assert statuses[0] == 200 and 429 in statuses
    time.sleep(3)
    cookie = requests.get(base + "/stats", cookies={"curate_token": token}, timeout=30)
    assert cookie.status_code == 200 and cookie.json()["rows"] == 33
    some = cookie.json()  # a verdict needs the token too
    verdict = {"sample_ids": ["0" * 32], "review": "accept", "reviewer": "ana"}
    assert some and requests.post(base + "/reviews", json=verdict,
                                  timeout=30).status_code == 401
    apply = {"queue": "threshold:nsfw_score:nsfw_score:max", "value": 0.5, "reviewer": "ana"}
    assert requests.post(base + "/applies", json=apply, timeout=30).status_code == 401
    output = _stop_and_check(spawn, process, signal.SIGINT)
    assert f"http://127.0.0.1:{port}/" in output and "with a token" in output, output[-3000:]
    assert "stopping" in output
    # 0: stopped in time; 130: past the deadline, the rest was killed (and it said so)
    assert process.returncode == 0 or (process.returncode == 130 and "killed" in output), \
        output


def test_curate_serve_stops_on_sigterm_with_everything_it_started(served, spawn, tmp_path):
    """SIGTERM (a supervisor, `kill PID`) stops `curate serve` like Ctrl-C: Serve, its Ray
    and Ray's agents are gone, none orphaned."""
    from .conftest import copy_store

    store = copy_store(served[1], tmp_path / "store")
    port = free_port()
    process = _curate_serve(spawn, store, port)
    output = _stop_and_check(spawn, process, signal.SIGTERM)
    assert "stopping" in output
    assert process.returncode == 0 or (process.returncode == 143 and "killed" in output), \
        output


STUCK = """
import subprocess, sys, time
from curate import stopping

CHILD = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "signal.signal(signal.SIGINT, signal.SIG_IGN); print(flush=True); time.sleep(600)")
with stopping.on_signals():
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
        child.stdout.readline()  # its handlers are set
        print(child.pid, flush=True)
        time.sleep(600)
    except KeyboardInterrupt:
        if sys.argv[1] == "stuck":
            time.sleep(600)  # a shutdown that never ends
"""


@pytest.mark.parametrize("how", ["stuck", "leaves"])
def test_a_stop_kills_what_outlives_it_and_says_so(spawn, how):
    """Past the deadline (a shutdown stuck) or after the shutdown (a process that ignores
    SIGTERM), what the command started is killed, and one line says so."""
    import psutil

    # a deadline shorter than the grace after a shutdown for the stuck one, longer for the
    # other, so each takes its own path
    env = {**os.environ, "CURATE_STOP_TIMEOUT": "1" if how == "stuck" else "60"}
    process = spawn([sys.executable, "-c", STUCK, how], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, env=env,
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    child = psutil.Process(int(process.stdout.readline()))
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.startswith("curate: ")]
    assert len(lines) == 1 and "killed 1 processes" in lines[0], err
    if how == "stuck":
        assert "took over 1 s (CURATE_STOP_TIMEOUT)" in lines[0]
        assert process.returncode == 130
    else:
        assert "still running after the shutdown" in lines[0], lines[0]
    child.wait(timeout=10)  # killed: gone, not merely signalled


def test_bad_serve_config_fails_before_starting(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("store: {uri: /nowhere}\nlimits: {burst: 0}\n"
                   "default_model: {autoscaling: {min_replicas: 3, max_replicas: 1}}\n")
    result = subprocess.run([sys.executable, "-m", "curate", "serve", "--config", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "limits.burst" in result.stderr and "max_replicas 1 < min_replicas 3" in \
        result.stderr


# --- the feature API never fetches internal addresses (SSRF) ---------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST", "[::1]", "0.0.0.0",
                                  "[::ffff:127.0.0.1]", "2130706433"])
def test_features_refuse_loopback_urls_without_contacting_them(base, host):
    from .test_egress import Server  # a loopback server standing for an internal service

    with Server(body=None, secret="internal secret answer") as internal:
        url = f"http://{host}:{internal.port}/secret-internal-path"
        response = post_features(base, uri=url)
        message = error_of(response, 403)
        assert message.startswith("not fetched: ") and "address" in message
        assert "internal secret answer" not in response.text and "404" not in message
        assert internal.hits == 0
