"""Export for training: WebDataset shards and Parquet written by Ray tasks from the table,
read back with the real `webdataset` package, pyarrow and a torch DataLoader; and
LanceDataset reading the table straight from Lance across workers and ranks."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate import Pipeline, load_config
from curate.config import StoreConfig
from curate.export import ExportError, export
from curate.export.buckets import SDXL, assign, parse_buckets
from curate.export.sharding import KEY, Order, histogram, plan, ranked, split
from curate.media.reader import MediaReader

from .conftest import copy_store


@pytest.fixture(scope="module")
def store(demo_store, tmp_path_factory) -> Path:
    """A private copy of the demo table (exports record themselves in its runs table)."""
    return copy_store(demo_store, tmp_path_factory.mktemp("export") / "store")


def table_rows(store: Path, where: str = "selected = true") -> dict[str, dict]:
    table = lancedb.connect(str(store)).open_table("samples").to_lance()
    return {r["sample_id"]: r for r in table.to_table(filter=where).to_pylist()}


def source_bytes(row: dict) -> bytes:
    return MediaReader().read(row["uri"], 1 << 30)


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


# --- the plan: exact shards whatever the split into tasks ----------------------------------


@pytest.mark.parametrize("seed,limit,task_rows", [(None, None, 50), (7, None, 64),
                                                  (7, 333, 50), (None, 5, 50)])
def test_writers_together_give_the_whole_order_in_exact_shards(monkeypatch, seed, limit,
                                                               task_rows):
    import curate.export.sharding as sharding

    monkeypatch.setattr(sharding, "TASK_ROWS", task_rows)
    rng = np.random.default_rng(1)
    ids = [hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest() for i in range(1000)]
    table = pa.table({"sample_id": ids, "width": rng.integers(100, 900, 1000),
                      "height": rng.integers(100, 900, 1000)})
    parts = [table.slice(0, 300), table.slice(300, 450), table.slice(750)]  # 3 scan tasks
    order = Order(seed)
    counts = sum(histogram(p, order) for p in parts)
    tasks = plan(counts, limit, shard_size=10)
    assert len(tasks) > 1 or (limit or 0) <= task_rows
    assert all((t.stop - t.start) % 10 == 0 for t in tasks[:-1])  # whole shards each
    pieces = [split(p, order, tasks) for p in parts]
    out = []
    for i, task in enumerate(tasks):
        rows = pa.concat_tables([p[i] for p in pieces])
        out += ranked(rows, task)["sample_id"].to_pylist()
    everything = order.annotate(table).sort_by([(KEY, "ascending"),
                                                ("sample_id", "ascending")])
    assert out == everything["sample_id"].to_pylist()[:limit]
    if seed is None:
        assert out == sorted(ids)[:limit]  # without a seed: sample_id order


def test_buckets_are_the_nearest_aspect_ratio():
    assert parse_buckets("sdxl") == SDXL
    assert parse_buckets("512x512, 768x512") == ("512x512", "768x512")
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_buckets("512by512")
    index = assign(np.array([1024, 1000, 768, 2000, 0]), np.array([768, 1000, 1024, 500, 10]),
                   SDXL)
    assert [SDXL[i] if i >= 0 else None for i in index] == [
        "1152x896", "1024x1024", "896x1152", "2048x512", None]


# --- WebDataset ------------------------------------------------------------------------------


def _read_with_webdataset(out: Path) -> list[dict]:
    """Every sample of the shards through the real webdataset package and a DataLoader
    with two workers (each worker reads its own shards)."""
    import torch
    import webdataset as wds

    shards = sorted(str(p) for p in out.glob("*.tar"))
    dataset = (wds.WebDataset(shards, shardshuffle=False, nodesplitter=None,
                              workersplitter=wds.split_by_worker)
               .map(lambda s: {"key": s["__key__"], "files": {k: v for k, v in s.items()
                                                                if not k.startswith("__")}}))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    return list(loader)


def test_webdataset_shards_hold_every_selected_row_once_with_its_bytes(store, tmp_path):
    out = tmp_path / "wds"
    summary = export(StoreConfig(uri=str(store)), {"out": str(out), "shard_size": 3})
    rows = table_rows(store)
    assert summary.selected == summary.written == len(rows) > 3
    samples = _read_with_webdataset(out)
    assert Counter(s["key"] for s in samples) == Counter({i: 1 for i in rows})
    for sample in samples:
        row, files = rows[sample["key"]], sample["files"]
        media = [k for k in files if k not in ("json", "txt")]
        assert len(media) == 1
        assert files[media[0]] == source_bytes(row)  # the original bytes, not re-encoded
        assert hashlib.sha256(files[media[0]]).hexdigest() == row["content_hash"]
        assert media[0] == {"JPEG": "jpg", "PNG": "png", "GIF": "gif"}.get(row["format"],
                                                                            media[0])
        meta = json.loads(files["json"])
        assert meta["sample_id"] == row["sample_id"] and meta["uri"] == row["uri"]
        assert meta["blur"] == pytest.approx(row["blur"])
        assert meta["aesthetic_score"] == pytest.approx(row["aesthetic_score"])
        assert meta["width"] == row["width"] and meta["selected"] is True
        assert "clip_embedding" not in meta and "row_stages_hash" not in meta
        assert not any(k.startswith("stamp_") for k in meta)
        if row.get("alt_text"):
            assert files["txt"].decode() == row["alt_text"]
        else:
            assert "txt" not in files
    index = json.loads((out / "index.json").read_text())
    sizes = [s["samples"] for s in index["shards"]]
    assert sizes == [3] * (len(rows) // 3) + ([len(rows) % 3] if len(rows) % 3 else [])
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar"
                                                     for i in range(len(sizes))]
    assert index["samples"] == len(rows) and index["filter"] == "selected = true"
    assert index["version"] == lancedb.connect(str(store)).open_table("samples").version
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files
    exports = [r for r in lancedb.connect(str(store)).open_table("samples_runs")
               .to_arrow().to_pylist() if r["kind"] == "export"]
    assert exports[-1]["run_id"] == summary.run_id and exports[-1]["status"] == "finished"
    assert exports[-1]["version_after"] == index["version"]
    assert json.loads(exports[-1]["stages_json"])["out"] == str(out)


def test_a_seed_shuffles_the_same_way_every_time_and_limit_takes_its_head(store, tmp_path):
    config = StoreConfig(uri=str(store))

    def order(name: str, **options) -> list[str]:
        out = tmp_path / name
        export(config, {"out": str(out), "shard_size": 4, "all": True,
                        "where": "error IS NULL", **options})
        return [n.split(".")[0] for p in sorted(out.glob("*.tar")) for n in members(p)
                if n.endswith(".json")]

    first, again, other = order("a", seed=7), order("b", seed=7), order("c", seed=8)
    assert first == again and sorted(first) == sorted(other) and first != other
    assert sorted(first) == sorted(table_rows(store, "error IS NULL"))
    assert order("plain") == sorted(first)  # no seed: sample_id order
    assert order("head", seed=7, limit=5) == first[:5]
    order("here", seed=7, executor="local")  # threads in this process, not Ray tasks
    for other in ("b", "here"):
        same = [(tmp_path / "a" / n).read_bytes() == (tmp_path / other / n).read_bytes()
                for n in os.listdir(tmp_path / "a") if n.endswith(".tar")]
        assert same and all(same), other  # byte for byte


def test_reencoding_and_buckets_grouped_into_shards(store, tmp_path):
    out = tmp_path / "buckets"
    export(StoreConfig(uri=str(store)), {"out": str(out), "image_format": "webp",
                                         "max_side": 200, "buckets": "sdxl",
                                         "group_by_bucket": True, "shard_size": 2})
    rows = table_rows(store)
    index = json.loads((out / "index.json").read_text())
    seen = 0
    for shard in index["shards"]:
        assert shard["name"].startswith(f"shard-{shard['bucket']}-")
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                key, ext = member.name.split(".", 1)
                if ext == "webp":
                    image = Image.open(io.BytesIO(data))
                    assert image.format == "WEBP" and max(image.size) <= 200
                    seen += 1
                elif ext == "json":
                    meta, row = json.loads(data), rows[key]
                    expected = SDXL[assign(np.array([row["width"]]),
                                           np.array([row["height"]]), SDXL)[0]]
                    assert meta["bucket"] == shard["bucket"] == expected
    assert seen == len(rows)


def test_changed_and_vanished_files_are_left_out_and_counted(ray_session, tmp_path):
    from curate.media.samples import write_photos

    paths = write_photos(tmp_path / "photos", 6, size=(320, 240), seed=3)
    config = {"name": "small", "store": {"uri": str(tmp_path / "store")},
              "stages": [{"type": "ingest_images", "paths": [str(tmp_path / "photos")]}]}
    pipeline = Pipeline.from_config(load_config(config))
    pipeline.run(progress=False)
    paths[0].unlink()
    paths[1].write_bytes(paths[2].read_bytes())  # other bytes under the same name
    summary = pipeline.export(tmp_path / "out", shard_size=10)
    assert summary.selected == 6 and summary.written == 4
    assert summary.skipped == {"missing": 1, "changed": 1}
    assert str(paths[1]) in summary.skipped_examples["changed"]
    names = members(tmp_path / "out" / "shard-000000.tar")
    assert len([n for n in names if n.endswith(".jpg")]) == 4
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["skipped"] == {"missing": 1, "changed": 1} and index["samples"] == 4


def test_clips_are_exported_as_mp4_cut_from_their_source(ray_session, tmp_path):
    from curate.media.samples import write_video_with_cuts
    from curate.media.video import VideoSource, probe

    (tmp_path / "videos").mkdir()
    write_video_with_cuts(tmp_path / "videos" / "v.mp4", [1.5, 1.5], (320, 180), fps=24,
                          seed=2)
    config = {"name": "clips", "store": {"uri": str(tmp_path / "store"), "table": "clips"},
              "stages": [{"type": "ingest_videos", "paths": [str(tmp_path / "videos")]},
                         {"type": "split_clips", "method": "fixed", "clip_s": 1.0,
                          "min_clip_s": 0.5}]}
    Pipeline.from_config(load_config(config)).run(progress=False)
    summary = export(StoreConfig(uri=str(tmp_path / "store"), table="clips"),
                     {"out": str(tmp_path / "out"), "where": "media_type = 'video_clip'"})
    rows = {r["sample_id"]: r for r in lancedb.connect(str(tmp_path / "store"))
            .open_table("clips").to_arrow().to_pylist()}
    assert summary.written == 3 and summary.skipped == {}
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        for member in (m for m in tar.getmembers() if m.name.endswith(".mp4")):
            row = rows[member.name.split(".")[0]]
            info = probe(VideoSource(data=tar.extractfile(member).read()))
            assert (info.codec, info.width, info.height) == ("h264", 320, 180)
            assert abs(info.num_frames - row["num_frames"]) <= 1


# --- Parquet ---------------------------------------------------------------------------------


def test_parquet_with_media_bytes_or_uris(store, tmp_path):
    rows = table_rows(store)
    export(StoreConfig(uri=str(store)), {"format": "parquet", "out": str(tmp_path / "b"),
                                         "shard_size": 5})
    parts = sorted((tmp_path / "b").glob("part-*.parquet"))
    assert len(parts) == -(-len(rows) // 5)
    table = pq.read_table(tmp_path / "b")
    assert sorted(table["sample_id"].to_pylist()) == sorted(rows)
    for record in table.to_pylist():
        row = rows[record["sample_id"]]
        assert hashlib.sha256(record["media"]).hexdigest() == row["content_hash"]
        assert record["blur"] == pytest.approx(row["blur"]) and record["uri"] == row["uri"]
        assert record["text"] == row.get("alt_text")
    # Hugging Face datasets reads the directory as one dataset (offline: local files)
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "b" / "*.parquet"),
                                   split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(loaded["sample_id"]) == sorted(rows)
    assert {r["sample_id"]: r["media"] for r in loaded} == {
        r["sample_id"]: r["media"] for r in table.to_pylist()}
    export(StoreConfig(uri=str(store)), {"format": "parquet", "out": str(tmp_path / "u"),
                                         "media": "uri", "columns": ["aesthetic_score"]})
    table = pq.read_table(tmp_path / "u")
    assert table.column_names == ["sample_id", "uri", "aesthetic_score", "text"]
    assert sorted(table["sample_id"].to_pylist()) == sorted(rows)


# --- refusals --------------------------------------------------------------------------------


def test_an_export_into_an_earlier_one_is_refused_unless_overwrite(store, tmp_path):
    config = StoreConfig(uri=str(store))
    export(config, {"out": str(tmp_path), "limit": 2})
    with pytest.raises(ExportError, match=r"already holds an export.*--overwrite"):
        export(config, {"out": str(tmp_path), "limit": 3})
    export(config, {"out": str(tmp_path), "limit": 3, "overwrite": True, "shard_size": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_bad_options_fail_before_any_work_naming_the_key(store, tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    def run(*args: str):
        return CliRunner().invoke(app, ["-v", "export", "--store", str(store), "--out",
                                        str(tmp_path / "x"), *args])

    for args, key in ((["--format", "tar"], "format"), (["--group-by-bucket"], "buckets"),
                      (["--buckets", "1024by1024"], "buckets"),
                      (["--shard-size", "0"], "shard_size")):
        result = run(*args)
        assert result.exit_code == 2 and key in result.output, (args, result.output)
    result = run("--where", "nope > 1")
    assert result.exit_code == 1 and "unknown column 'nope'" in result.output
    result = run("--columns", "blur,nope")
    assert result.exit_code == 1 and "unknown columns nope" in result.output
    assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")
    result = CliRunner().invoke(app, ["-v", "export", "--store", str(tmp_path / "none"),
                                      "--out", str(tmp_path / "y")])
    assert result.exit_code == 1 and "no table samples" in result.output


# --- LanceDataset ----------------------------------------------------------------------------


def sample_id_of(sample: dict) -> str:
    return sample["sample_id"]


def _loader_ids(dataset, workers: int) -> list[str]:
    import torch

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers,
        # Lance is not fork-safe: workers start fresh
        multiprocessing_context=multiprocessing.get_context("spawn") if workers else None)
    return list(loader)


def test_lance_dataset_sees_every_row_once_across_workers_and_ranks(store):
    from curate.data import LanceDataset

    rows = table_rows(store)
    seen = []
    for rank in range(2):
        dataset = LanceDataset(str(store), rank=rank, world_size=2, unit_rows=2,
                               transform=sample_id_of)
        assert dataset.count() == len(rows)
        seen += _loader_ids(dataset, workers=2)
    assert Counter(seen) == Counter({i: 1 for i in rows})
    # the same order every time; `start` resumes inside it
    full = [s["sample_id"] for s in LanceDataset(str(store), unit_rows=2, decode=False)]
    assert len(full) == len(rows)
    for start in (0, 1, 3, len(full) - 1, len(full) + 2):
        resumed = LanceDataset(str(store), unit_rows=2, decode=False, start=start)
        assert [s["sample_id"] for s in resumed] == full[start:]


def test_lance_dataset_decodes_filters_and_reads_a_version(store):
    from curate.data import LanceDataset

    rows = table_rows(store, "selected = true AND width >= 400")
    dataset = LanceDataset(str(store), where="width >= 400", columns=["sample_id", "width"],
                           max_side=128)
    samples = list(dataset)
    assert sorted(s["sample_id"] for s in samples) == sorted(rows)
    for sample in samples:
        original = Image.open(io.BytesIO(source_bytes(rows[sample["sample_id"]])))
        assert sample["image"].mode == "RGB" and max(sample["image"].size) <= 128
        assert sample["width"] == original.size[0] or sample["width"] == original.size[1]
    first = lancedb.connect(str(store)).open_table("samples").list_versions()[1]["version"]
    early = LanceDataset(str(store), version=first, selected=None, decode=False)
    assert early.version == first
    with pytest.raises(Exception, match="unknown column 'nope'"):
        LanceDataset(str(store), where="nope = 1")


def test_lance_dataset_skips_rows_whose_file_changed(ray_session, tmp_path):
    from curate.data import LanceDataset
    from curate.media.samples import write_photos

    paths = write_photos(tmp_path / "photos", 4, size=(200, 150), seed=5)
    config = {"name": "small", "store": {"uri": str(tmp_path / "store")},
              "stages": [{"type": "ingest_images", "paths": [str(tmp_path / "photos")]}]}
    Pipeline.from_config(load_config(config)).run(progress=False)
    shutil.copy(paths[1], paths[0])
    dataset = LanceDataset(str(tmp_path / "store"))
    assert len(list(dataset)) == 3 and dataset.skipped == {"changed": 1}
