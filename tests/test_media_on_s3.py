"""Media in object storage: objects listed page by page and read through the store's
options, globs and prefixes, the errors a user can act on, and a run over a bucket giving
the verdicts the same files give from a local folder (moto's S3 server on loopback,
checking signatures)."""

from __future__ import annotations

import importlib
import io
import json
import shutil
import signal
import tarfile

import boto3
import lancedb
import pytest
import yaml

from curate import Pipeline, load_config
from curate.config import StoreConfig
from curate.data import LanceDataset
from curate.errors import RunError
from curate.export import ExportError, export
from curate.media import objstore
from curate.media.decode import (
    TRANSIENT_CODES,
    MediaError,
    content_hash,
    error_code,
    list_tar,
)
from curate.media.reader import MediaReader
from curate.media.video import VideoSource, probe
from curate.stages.image.ingest_images import IngestImages
from curate.stages.video.ingest_videos import IngestVideos

from .conftest import BUCKET, ROOT, FlakyEndpoint, serve_settings

MEDIA = ROOT / "examples" / "media"
VIDEOS = ROOT / "examples" / "videos"
#: The demo's folders (its tar shard goes under shards/).
FOLDERS = ("photos", "variants", "low_quality", "broken", "odd")
SHARD = "shard-000000.tar"


def client(options):
    return boto3.client("s3", endpoint_url=options["aws_endpoint"], region_name="us-east-1",
                        aws_access_key_id=options["aws_access_key_id"],
                        aws_secret_access_key=options["aws_secret_access_key"])


def manifest_lines(base: str, where: str) -> str:
    """A manifest naming files under `extra/` three ways: a key (path) relative to the
    manifest, the whole URI (path), and one that is not there."""
    return "".join(json.dumps(row) + "\n" for row in [
        {"uri": "../extra/coffee.jpg", "caption": "a cup"},
        {"uri": f"{base}/extra/logo.png", "caption": "a logo"},
        {"uri": "../extra/gone.jpg", "caption": where}])


@pytest.fixture(scope="module")
def media_on_s3(s3):
    """The demo's folders uploaded under media/, its shard under shards/, a manifest under
    lists/ naming files under extra/, the demo videos under videos/ (and 12 small objects
    under small/)."""
    s3c = client(s3)
    for folder in FOLDERS:
        for path in sorted((MEDIA / folder).iterdir()):
            s3c.upload_file(str(path), BUCKET, f"media/{folder}/{path.name}")
    s3c.upload_file(str(MEDIA / SHARD), BUCKET, f"shards/{SHARD}")
    s3c.upload_file(str(MEDIA / "photos" / "coffee.jpg"), BUCKET, "extra/coffee.jpg")
    s3c.upload_file(str(MEDIA / "odd" / "logo_rgba.png"), BUCKET, "extra/logo.png")
    s3c.put_object(Bucket=BUCKET, Key="lists/extra.jsonl",
                   Body=manifest_lines(f"s3://{BUCKET}", "bucket").encode())
    for path in sorted(VIDEOS.rglob("*")):
        if path.is_file():
            s3c.upload_file(str(path), BUCKET, f"videos/{path.relative_to(VIDEOS)}")
    for k in range(12):
        s3c.put_object(Bucket=BUCKET, Key=f"small/{'ab'[k % 2]}/{k:02d}.bin",
                       Body=bytes([k]) * (k + 1))
    # what consoles and desktops leave: folder markers and hidden files
    photo = (MEDIA / "photos" / "coffee.jpg").read_bytes()
    for key, body in [("tree/", b""), ("tree/top.jpg", photo), ("tree/sub/", b""),
                      ("tree/sub/deep.jpg", photo), ("tree/sub/.DS_Store", b"x"),
                      ("tree/._top.jpg", b"x"), ("tree/sub/note.png", photo)]:
        s3c.put_object(Bucket=BUCKET, Key=key, Body=body)
    return s3


def test_listing_comes_in_pages_and_reads_give_the_bytes(media_on_s3):
    options = media_on_s3
    pages = list(objstore.list_pages(f"s3://{BUCKET}/small", options, page=5))
    assert [len(p) for p in pages] == [5, 5, 2]
    listed = client(options).list_objects_v2(Bucket=BUCKET, Prefix="small/")["Contents"]
    assert [item for page in pages for item in page] == [
        (f"s3://{BUCKET}/{o['Key']}", o["Size"]) for o in listed]
    assert list(objstore.walk_level(f"s3://{BUCKET}/small/", options, 3)) == [
        ("prefix", f"s3://{BUCKET}/small/a"), ("prefix", f"s3://{BUCKET}/small/b")]
    assert objstore.read(f"s3://{BUCKET}/small/a/04.bin", options, 100) == bytes([4]) * 5
    with pytest.raises(MediaError, match="too_large"):
        objstore.read(f"s3://{BUCKET}/small/a/04.bin", options, 4)


def test_a_flat_level_is_split_by_key_bounds_never_held_whole(media_on_s3, monkeypatch):
    """The driver splits a level into runs of objects by their first and last keys and a
    unit per prefix, skipping each prefix's keys; the units list exactly what a local
    listing would (the level's objects, the prefixes' objects, no markers, no hidden
    names), checked against boto3's own listing."""
    from curate.stages.image import ingest_images

    s3c = client(media_on_s3)
    keys = [f"flat/{k:03d}.jpg" for k in range(23)] + [
        "flat/010/", "flat/010/in.jpg", "flat/010-x.jpg", "flat/017/deep/a.jpg",
        "flat/.hidden.jpg", "flat/017/.h.jpg", "flat/été.jpg",
        "flat/été/b.jpg"]
    for key in keys:
        s3c.put_object(Bucket=BUCKET, Key=key, Body=b"" if key.endswith("/") else b"x")
    monkeypatch.setattr(ingest_images, "LIST_CHUNK", 5)
    stage = IngestImages(paths=[f"s3://{BUCKET}/flat/"], storage_options=media_on_s3)
    units = stage.list_entries()
    runs = [u for u in units if "last" in u]
    assert all("files" not in u for u in units) and len(runs) == 6  # 26 under flat/
    assert [u["prefix"] for u in units if "last" not in u] == [
        f"s3://{BUCKET}/flat/010", f"s3://{BUCKET}/flat/017", f"s3://{BUCKET}/flat/été"]
    listed = sorted(uri for u in units for uri in stage.list_entry(u)["uri"].to_pylist())
    pages = s3c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="flat/")
    want = sorted(f"s3://{BUCKET}/{o['Key']}" for p in pages for o in p["Contents"]
                  if not o["Key"].endswith("/") and "/." not in o["Key"])
    assert listed == want and len(want) == 28
    # a run per object: bounds fall right before folders and their markers too
    monkeypatch.setattr(ingest_images, "LIST_CHUNK", 1)
    units = stage.list_entries()
    assert sum("last" in u for u in units) == 26
    assert sorted(uri for u in units for uri in stage.list_entry(u)["uri"].to_pylist()) == want


def test_each_failure_is_one_line_saying_what_to_check(media_on_s3):
    options = media_on_s3
    cases = {
        f"s3://{BUCKET}/small/none.bin": (options, "missing", "no such object"),
        "s3://no-such-bucket/x.jpg": (options, "missing", "no bucket s3://no-such-bucket"),
        f"s3://{BUCKET}/small/a/00.bin": ({**options, "aws_secret_access_key": "wrong"},
                                          "denied", "check the keys"),
        f"s3://{BUCKET}/small/b/01.bin": ({**options, "aws_endpoint": "http://127.0.0.1:1",
                                           "max_retries": "1", "retry_timeout_s": "2",
                                           "connect_timeout": "1s"},
                                          "unreachable", "check the endpoint"),
        f"s3://{BUCKET}/small/b/03.bin": ({**options, "no_such_option": "x"}, "unreadable",
                                          "cannot be opened with these storage_options"),
    }
    for uri, (given, code, says) in cases.items():
        with pytest.raises(MediaError) as caught:
            objstore.read(uri, given, 1000)
        assert caught.value.code == code and says in str(caught.value), str(caught.value)
        assert "\n" not in str(caught.value) and uri in str(caught.value)
    for bad in ({"max_retries": "many"}, {"retry_timeout_s": "-1"}):  # refused by the config
        with pytest.raises(ValueError, match=f"storage_options.{next(iter(bad))}"):
            IngestImages(paths=[f"s3://{BUCKET}/small/"], storage_options=bad)


def test_prefixes_globs_and_single_objects_are_listed(media_on_s3):
    options = media_on_s3

    def listed(*paths):
        stage = IngestImages(paths=list(paths), storage_options=options)
        return sorted(stage.list_inputs()["uri"].to_pylist())

    photos = sorted(f"s3://{BUCKET}/media/photos/{p.name}" for p in (MEDIA / "photos").iterdir())
    assert listed(f"s3://{BUCKET}/media/photos/") == photos
    assert listed(f"s3://{BUCKET}/media/photos/*.jpg") == [u for u in photos
                                                          if u.endswith(".jpg")]
    assert listed(photos[0]) == photos[:1]
    tree = f"s3://{BUCKET}/tree"  # as glob.glob(recursive=True) reads a local copy
    assert listed(f"{tree}/") == [f"{tree}/sub/deep.jpg", f"{tree}/sub/note.png",
                                  f"{tree}/top.jpg"]
    assert listed(f"{tree}/*.jpg") == [f"{tree}/top.jpg"]
    assert listed(f"{tree}/**/*.jpg") == [f"{tree}/sub/deep.jpg", f"{tree}/top.jpg"]
    assert listed(f"{tree}/s?b/[mn]*") == [f"{tree}/sub/note.png"]
    assert listed(f"{tree}/._top.jpg") == [f"{tree}/._top.jpg"]  # named: read, as locally
    everything = listed(f"s3://{BUCKET}/media")
    assert len(everything) == sum(len(list((MEDIA / f).iterdir())) for f in FOLDERS)
    for path, says in [(f"s3://{BUCKET}/media/nothing-here.jpg", "no such object"),
                       ("s3://no-such-bucket/media/", "no bucket")]:
        with pytest.raises(RunError, match=f"ingest_images.paths.0: .*{says}"):
            listed(path)


def local_copy(root):
    """The bucket's media/, shards/, lists/ and extra/ as a local folder."""
    for folder in FOLDERS:
        shutil.copytree(MEDIA / folder, root / "media" / folder)
    (root / "shards").mkdir()
    shutil.copy(MEDIA / SHARD, root / "shards")
    (root / "extra").mkdir()
    shutil.copy(MEDIA / "photos" / "coffee.jpg", root / "extra")
    shutil.copy(MEDIA / "odd" / "logo_rgba.png", root / "extra" / "logo.png")
    (root / "lists").mkdir()
    (root / "lists" / "extra.jsonl").write_text(manifest_lines(str(root), "bucket"))
    return root


def compared(rows: list[dict], root: str, keep: tuple[str, ...]) -> tuple[dict, dict]:
    """Rows by their uri under `root` (columns `keep`, an error by its code: a missing
    file and a missing object say so in their own words), and each group of copies with
    how many of it are kept."""
    names = {r["sample_id"]: r["uri"].removeprefix(root) for r in rows}
    parent = {r["sample_id"]: r["duplicate_of"] for r in rows if r["duplicate_of"]}

    def first(sample_id):
        while sample_id in parent:
            sample_id = parent[sample_id]
        return sample_id

    groups: dict[str, set] = {}
    for r in rows:
        groups.setdefault(first(r["sample_id"]), set()).add(names[r["sample_id"]])
    # which copy of identical files is kept follows the sample_ids, made from the uris
    kept = {frozenset(g): sum(r["selected"] for r in rows if names[r["sample_id"]] in g)
            for g in groups.values()}
    table = {names[r["sample_id"]]: {**{k: r[k] for k in keep},
                                     "error": error_code(r["error"])} for r in rows}
    return table, kept


@pytest.fixture(scope="module")
def image_stores(ray_session, media_on_s3, tmp_path_factory):
    """The same files (folders, a WebDataset shard, a manifest of relative keys and whole
    URIs) run from the bucket and from a local copy: {"bucket"/"local": (store, root)}."""
    root = tmp_path_factory.mktemp("s3-images")
    local = local_copy(root / "local")
    stores = {}
    for name, where in (("bucket", f"s3://{BUCKET}"), ("local", str(local))):
        raw = {"name": "s3-media", "store": {"uri": str(root / name)},
               "run": {"executor": "local"},
               "stages": [{"type": "ingest_images",
                           "paths": [f"{where}/media/", f"{where}/shards/{SHARD}",
                                     f"{where}/lists/extra.jsonl"],
                           "storage_options": media_on_s3},
                          {"type": "image_quality", "min_side": 128, "min_blur": 10},
                          {"type": "exact_dedup"},
                          {"type": "phash_dedup", "max_distance": 8}]}
        assert Pipeline.from_config(load_config(raw)).run(progress=False).status == \
            "finished"
        stores[name] = (root / name, where)
    return stores


def test_a_run_over_a_bucket_decides_as_over_a_local_folder(image_stores, media_on_s3):
    """The same rows, hashes and verdicts from the bucket as from the local copy (the
    uris aside); the run record keeps the config without the secret key."""
    def compare(name):
        store, root = image_stores[name]
        rows = lancedb.connect(str(store)).open_table("samples").to_arrow().to_pylist()
        return compared(rows, f"{root}/", ("content_hash", "width", "height", "format",
                                           "alt_text", "quality_reason"))

    from_bucket, bucket_groups = compare("bucket")
    from_disk, disk_groups = compare("local")
    record = lancedb.connect(str(image_stores["bucket"][0])).open_table("samples_runs") \
        .to_arrow()["config_yaml"][0].as_py()
    assert media_on_s3["aws_secret_access_key"] not in record
    assert yaml.safe_load(record)["stages"][0]["storage_options"] == {
        **media_on_s3, "aws_secret_access_key": "<redacted>"}
    assert from_bucket == from_disk and bucket_groups == disk_groups
    shard = [name for name in from_bucket if name.startswith(f"shards/{SHARD}#")]
    assert len(shard) > 1 and any(from_bucket[n]["alt_text"] for n in shard)
    assert from_bucket["extra/coffee.jpg"]["alt_text"] == "a cup"
    assert from_bucket["extra/logo.png"]["content_hash"]
    assert from_bucket["extra/gone.jpg"]["error"] == "missing"
    assert any(r["error"] for r in from_bucket.values())
    assert any(len(g) > 1 for g in bucket_groups)


def samples_of_webdataset(shards: list[str], options) -> dict[str, dict]:
    """Every sample of the shards, read by the webdataset package, the shards opened by
    boto3 (a client of its own, not curate's)."""
    import webdataset as wds
    opening = importlib.import_module("webdataset.gopen")

    s3c = client(options)

    def opener(url, mode="rb", bufsize=8192, **kw):
        bucket, _, key = url.removeprefix("s3://").partition("/")
        return s3c.get_object(Bucket=bucket, Key=key)["Body"]

    opening.gopen_schemes["s3"] = opener
    try:
        return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
                for s in wds.WebDataset(shards, shardshuffle=False, nodesplitter=None)}
    finally:
        del opening.gopen_schemes["s3"]


def test_an_export_to_a_bucket_reads_back_with_webdataset_and_pyarrow(
        image_stores, media_on_s3, tmp_path):
    """`curate export --out s3://...` from the table made from the bucket: shards and
    parts read back by the webdataset package and pyarrow.dataset hold what an export of
    the local table to a local folder holds; the index comes last; a second export into
    the prefix is refused unless overwrite."""
    import pyarrow.dataset as ds
    from pyarrow import fs
    from typer.testing import CliRunner

    from curate.cli import app

    store, _ = image_stores["bucket"]
    config = StoreConfig(uri=str(store), media_storage_options=media_on_s3)
    out = f"s3://{BUCKET}/exports/wds"
    summary = export(config, {"out": out, "shard_size": 4})
    local = export(StoreConfig(uri=str(image_stores["local"][0])),
                   {"out": str(tmp_path / "wds"), "shard_size": 4})
    s3c = client(media_on_s3)
    index = json.loads(s3c.get_object(Bucket=BUCKET, Key="exports/wds/index.json")["Body"]
                       .read())
    # the same index but for the shards' contents (rows are ordered by sample_id, a hash
    # of the uri)
    local_index = json.loads((tmp_path / "wds" / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [
        s["samples"] for s in local_index["shards"]]
    assert {k: v for k, v in index.items() if k not in ("store", "run_id", "shards")} == {
        k: v for k, v in local_index.items() if k not in ("store", "run_id", "shards")}
    listed = [o["Key"] for o in s3c.list_objects_v2(Bucket=BUCKET, Prefix="exports/wds/")
              ["Contents"]]
    assert sorted(listed) == sorted(["exports/wds/index.json"] + [
        f"exports/wds/{s['name']}" for s in index["shards"]])  # no temporary objects
    from_bucket = samples_of_webdataset([f"{out}/{s['name']}" for s in index["shards"]],
                                        media_on_s3)
    from_disk = samples_of_webdataset(sorted(str(p) for p in (tmp_path / "wds").glob("*.tar")),
                                      media_on_s3)

    def by_hash(samples):
        """The media (the original bytes: their hash is the row's, the same from either
        place) and blur of each sample. Which of identical copies is kept follows the
        sample_ids, so their captions are checked against the table instead."""
        out = {}
        for files in samples.values():
            media = next(k for k in files if k not in ("json", "txt"))
            out[content_hash(files[media])] = (files[media], json.loads(files["json"])["blur"])
        return out

    assert summary.written == local.written == len(from_bucket) > 4
    assert by_hash(from_bucket) == by_hash(from_disk)
    table = {r["sample_id"]: r for r in lancedb.connect(str(store)).open_table("samples")
             .to_arrow().to_pylist()}
    for key, files in from_bucket.items():
        assert files.get("txt", b"").decode() == (table[key]["alt_text"] or "")
        media = next(k for k in files if k not in ("json", "txt"))
        assert content_hash(files[media]) == table[key]["content_hash"]
    # a training loader over the same table reads the same images from the bucket
    loaded = {s["sample_id"]: s["image"] for s in LanceDataset(
        str(store), columns=["sample_id"], media_storage_options=media_on_s3)}
    assert sorted(loaded) == sorted(from_bucket) and not any(
        im.size != (table[k]["width"], table[k]["height"]) for k, im in loaded.items()
        if max(table[k]["width"], table[k]["height"]) <= 1024)
    with pytest.raises(ExportError, match="already holds an export"):
        export(config, {"out": out})
    with pytest.raises(ExportError, match="shard_bytes 6,442,450,944 is over"):
        export(config, {"out": f"{out}-big", "shard_bytes": 6 * 1024**3})
    assert export(config, {"out": out, "overwrite": True, "shard_size": 100}).written == \
        summary.written

    # the command: media reached with the config's store.media_storage_options, the
    # prefix written with --storage-option
    named = tmp_path / "config.yaml"
    named.write_text(yaml.safe_dump({
        "name": "s3-media", "store": {"uri": str(store), "media_storage_options": media_on_s3},
        "stages": [{"type": "ingest_images", "paths": [f"s3://{BUCKET}/media/"]}]}))
    args = ["export", "--config", str(named), "--format", "parquet", "--shard-size", "5",
            "--out", f"s3://{BUCKET}/exports/pq", "--no-progress"]
    args += [f"--storage-option={k}={v}" for k, v in media_on_s3.items()]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"into s3://{BUCKET}/exports/pq" in result.output
    parts = fs.S3FileSystem(
        access_key=media_on_s3["aws_access_key_id"],
        secret_key=media_on_s3["aws_secret_access_key"], region="us-east-1", scheme="http",
        endpoint_override=media_on_s3["aws_endpoint"].removeprefix("http://"))
    table = ds.dataset(f"{BUCKET}/exports/pq", filesystem=parts, format="parquet",
                       exclude_invalid_files=True).to_table()
    assert sorted(content_hash(m) for m in table["media"].to_pylist()) == sorted(
        by_hash(from_bucket))


def test_objects_are_read_in_place_by_ranges(media_on_s3):
    """An object read as a seekable file gives the local file's bytes at every offset;
    a shard's members are found where the local shard has them; the reader behind serve
    and export reads objects, shard members and videos."""
    options = media_on_s3
    local = (VIDEOS / "cuts.mp4").read_bytes()
    with objstore.ObjectFile(f"s3://{BUCKET}/videos/cuts.mp4", options, buffer=4096) as f:
        for offset, size in [(0, 10), (len(local) - 7, 100), (123_457, 65_536), (5, 0)]:
            f.seek(offset)
            assert f.read(size) == local[offset:offset + size]
        assert f.seek(0, 2) == len(local)
    with objstore.ObjectFile(f"s3://{BUCKET}/shards/{SHARD}", options) as shard:
        listed = [(m.name, m.offset_data, m.size) for m in list_tar(shard)]
    assert listed == [(m.name, m.offset_data, m.size) for m in list_tar(str(MEDIA / SHARD))]
    # tarfile seeks past each member to the next 512-byte header: the file's own buffer
    # serves them, one range request per 64 KB of the shard, not one per member
    many = io.BytesIO()
    with tarfile.open(fileobj=many, mode="w") as tar:
        for k in range(200):
            info = tarfile.TarInfo(f"{k:04d}.txt")
            info.size = 1000
            tar.addfile(info, io.BytesIO(bytes([k % 256]) * 1000))
    client(options).put_object(Bucket=BUCKET, Key="shards/many.tar", Body=many.getvalue())
    with FlakyEndpoint(options, lambda *request: False) as counted:
        with objstore.ObjectFile(f"s3://{BUCKET}/shards/many.tar", counted.options,
                                 buffer=65_536) as shard:
            assert len(list_tar(shard)) == 200
        assert counted.requests <= -(-len(many.getvalue()) // 65_536) + 1  # and a HEAD
    reader = MediaReader(storage_options=options)
    name, _, size = listed[0]
    with tarfile.open(MEDIA / SHARD) as tar:
        member = tar.extractfile(name).read()
    assert reader.read(f"s3://{BUCKET}/shards/{SHARD}#{name}", size) == member
    photo = (MEDIA / "photos" / "coffee.jpg").read_bytes()
    assert reader.read_checked(f"s3://{BUCKET}/extra/coffee.jpg", len(photo),
                               content_hash(photo)) == photo
    source = reader.video_source(f"s3://{BUCKET}/videos/cuts.mp4", content_hash(local))
    assert probe(source) == probe(VideoSource(str(VIDEOS / "cuts.mp4")))
    with pytest.raises(MediaError, match="changed since it was ingested"):
        reader.video_source(f"s3://{BUCKET}/videos/slideshow.mp4", content_hash(local))

    # a writer's object appears when it is closed, never when it is given up or dropped
    for end in ("close", "abort", "drop"):
        writer = objstore.ObjectWriter(f"s3://{BUCKET}/written/{end}", options, buffer=5 << 20)
        writer.write(b"x" * (6 << 20))  # a part is uploaded already
        if end == "drop":
            del writer
        else:
            getattr(writer, end)()
    keys = [o["Key"] for o in client(options).list_objects_v2(
        Bucket=BUCKET, Prefix="written/").get("Contents", [])]
    assert keys == ["written/close"]


def video_run(root: str, store, options, extra: list) -> tuple[object, list[dict]]:
    raw = {"name": "s3-videos", "store": {"uri": str(store), "table": "clips"},
           "run": {"executor": "local"},
           "stages": [{"type": "ingest_videos", "paths": [f"{root}/videos/"],
                       "storage_options": options},
                      {"type": "split_clips", "method": "scenes", "min_clip_s": 1.0,
                       "max_clip_s": 4.0, "frames_per_clip": 3},
                      {"type": "motion_score", "min_score": 0.5},
                      {"type": "exact_dedup"}, *extra]}
    summary = Pipeline.from_config(load_config(raw)).run(progress=False)
    assert summary.status == "finished"
    return summary, lancedb.connect(str(store)).open_table("clips").to_arrow().to_pylist()


@pytest.fixture(scope="module")
def video_stores(ray_session, media_on_s3, tmp_path_factory):
    """The demo videos cut into clips from the bucket (read in place) and from a local
    folder."""
    root = tmp_path_factory.mktemp("s3-videos")
    local = root / "local"
    shutil.copytree(VIDEOS, local / "videos")
    stores = {"bucket": root / "from-bucket", "local": root / "from-disk"}
    video_run(f"s3://{BUCKET}", stores["bucket"], media_on_s3, [])
    video_run(str(local), stores["local"], media_on_s3, [])
    return stores, str(local)


def test_videos_in_a_bucket_are_cut_as_local_ones(video_stores, media_on_s3, tmp_path):
    """Clips cut from videos in the bucket equal those cut from a local copy, and a stage
    added later reads each clip's frames again from the bucket by its span (no video
    read whole into memory), giving what a fresh local run gives."""
    stores, local = video_stores
    keep = ("clip_start_s", "clip_end_s", "frame_times", "source_hash", "content_hash",
            "motion", "num_frames", "selected")

    def rows_of(store):
        return lancedb.connect(str(store)).open_table("clips").to_arrow().to_pylist()

    def by_clip(rows, root):
        return {(r["uri"].removeprefix(root), r["clip_start_s"]): {
            **{k: r.get(k) for k in keep}, "error": error_code(r["error"])} for r in rows}

    bucket = by_clip(rows_of(stores["bucket"]), f"s3://{BUCKET}/")
    assert bucket == by_clip(rows_of(stores["local"]), f"{local}/")
    assert sum(1 for r in bucket.values() if r["clip_start_s"] is not None) > 3
    assert {r["error"] for r in bucket.values()} >= {"empty", "truncated", "not_a_video"}
    assert any(uri.startswith("videos/shard-videos.tar#") for uri, _ in bucket)

    extra = [{"type": "image_quality", "min_side": 64, "min_blur": 5}]
    again = shutil.copytree(stores["bucket"], tmp_path / "again")
    summary, rows = video_run(f"s3://{BUCKET}", again, media_on_s3, extra)
    counts = {s.name: s for s in summary.stages}
    assert counts["split_clips"].rows_computed == 0  # nothing cut again
    assert counts["image_quality"].rows_computed > 0
    _, fresh = video_run(local, tmp_path / "fresh", media_on_s3, extra)
    quality = ("blur", "quality_reason", "selected")

    def scores(rows, root):
        return {(r["uri"].removeprefix(root), r["clip_start_s"]): {k: r[k] for k in quality}
                for r in rows}

    assert scores(rows, f"s3://{BUCKET}/") == scores(fresh, f"{local}/")


def test_serve_plays_clips_cut_from_a_video_in_the_bucket(video_stores, media_on_s3,
                                                          tmp_path):
    """The real Serve app over the table made from the bucket: a clip's media is a cut of
    just that clip, read from the bucket by ranges with store.media_storage_options; a
    source overwritten in the bucket is refused as changed."""
    import requests

    from curate.serve.config import load_serve_config
    from curate.serve.server import start, stop

    stores, _ = video_stores
    store = shutil.copytree(stores["bucket"], tmp_path / "served")
    settings = serve_settings(store)
    settings["store"].update(table="clips", media_storage_options=media_on_s3)
    url = start(load_serve_config(settings))
    try:
        rows = requests.get(f"{url}/samples", timeout=60, params={
            "where": "media_type = 'video_clip' AND uri LIKE '%slideshow.mp4'",
            "limit": 10}).json()["rows"]
        assert rows
        for row in rows:
            got = requests.get(f"{url}/samples/{row['sample_id']}/media", timeout=120)
            assert got.status_code == 200, got.text
            path = tmp_path / f"{row['clip_index']}.mp4"
            path.write_bytes(got.content)
            assert probe(VideoSource(str(path))).num_frames == row["num_frames"]
        s3c = client(media_on_s3)
        original = (VIDEOS / "slideshow.mp4").read_bytes()
        s3c.put_object(Bucket=BUCKET, Key="videos/slideshow.mp4", Body=original[:-4] + b"abcd")
        try:
            got = requests.get(f"{url}/samples/{rows[0]['sample_id']}/media",
                               params={"format": "webm"}, timeout=120)
            assert got.status_code == 410 and "changed" in got.json()["error"]
        finally:
            s3c.put_object(Bucket=BUCKET, Key="videos/slideshow.mp4", Body=original)
    finally:
        stop()


def test_a_burst_of_503s_is_survived_and_an_object_that_keeps_failing_is_read_next_run(
        ray_session, media_on_s3, tmp_path):
    """Through an endpoint that answers 503 SlowDown to every second request of the first
    20, a run over a prefix and a shard finishes with every row as a healthy endpoint
    gives it (the store's retries with backoff); an object that fails every time is one
    row saying so while the run goes on, and the next run reads that row again."""
    def raw(options, store):
        return {"name": "flaky", "store": {"uri": str(store)}, "run": {"executor": "local"},
                "stages": [{"type": "ingest_images", "storage_options": options,
                            "paths": [f"s3://{BUCKET}/media/photos/",
                                      f"s3://{BUCKET}/shards/{SHARD}"]}]}

    def rows(store):
        table = lancedb.connect(str(store)).open_table("samples").to_arrow()
        return {r["uri"]: (r["content_hash"], r["error"]) for r in table.to_pylist()}

    healthy = tmp_path / "healthy"
    Pipeline.from_config(load_config(raw(media_on_s3, healthy))).run(progress=False)
    expected = rows(healthy)  # the shard's own damaged samples aside, every row is read
    assert not any(error_code(error) in TRANSIENT_CODES for _, error in expected.values())

    with FlakyEndpoint(media_on_s3, lambda n, method, path: n <= 20 and n % 2 == 0) as flaky:
        store = tmp_path / "burst"
        summary = Pipeline.from_config(load_config(raw(flaky.options, store))).run(
            progress=False)
        assert summary.status == "finished" and flaky.failed == 10
    assert rows(store) == expected

    def coffee_fails(n, method, path):
        return method == "GET" and path.startswith(f"/{BUCKET}/media/photos/coffee.jpg")

    with FlakyEndpoint(media_on_s3, coffee_fails) as flaky:
        store = tmp_path / "one-fails"
        options = {**flaky.options, "max_retries": "1", "retry_timeout_s": "5"}
        Pipeline.from_config(load_config(raw(options, store))).run(progress=False)
        failing = rows(store)
        coffee = f"s3://{BUCKET}/media/photos/coffee.jpg"
        assert failing[coffee][1].startswith("unavailable: ") and "503" in failing[coffee][1]
        assert "\n" not in failing[coffee][1]
        assert {u: v for u, v in failing.items() if u != coffee} == {
            u: v for u, v in expected.items() if u != coffee}
    Pipeline.from_config(load_config(raw(media_on_s3, store))).run(progress=False)
    assert rows(store) == expected

    # a video whose reads keep failing after its size was read: a row to read again
    def ranges_fail(n, method, path):
        return method == "GET" and path.startswith(f"/{BUCKET}/videos/cuts.mp4")

    with FlakyEndpoint(media_on_s3, ranges_fail) as flaky:
        source = IngestVideos(paths=[f"s3://{BUCKET}/videos/cuts.mp4"], storage_options={
            **flaky.options, "max_retries": "1", "retry_timeout_s": "5"})
        loaded, _ = source.load(source.list_inputs())
        assert loaded["error"][0].as_py().startswith("unavailable: "), loaded["error"][0]


def test_a_run_over_a_bucket_killed_midway_resumes_to_the_same_table(
        ray_session, media_on_s3, tmp_path, spawn):
    """`curate run` over a prefix, killed with SIGKILL after its first commit (its reads
    slowed by a proxy), then run again: the table of one uninterrupted run."""
    from curate.media.samples import write_photos

    from .test_resume import interrupted, rows_in, table_of

    photos = write_photos(tmp_path / "photos", 40, size=(320, 240), seed=3)
    s3c = client(media_on_s3)
    for path in photos:
        s3c.upload_file(str(path), BUCKET, f"many/{path.name}")

    def config(options, store):
        return {"name": "resume-s3", "store": {"uri": str(store)},
                "run": {"commit_every": 4, "num_cpus": 2, "executor": "local"},
                "stages": [{"type": "ingest_images", "paths": [f"s3://{BUCKET}/many/"],
                            "storage_options": options, "resources": {"batch_size": 2}},
                           {"type": "image_quality", "min_side": 128, "min_blur": 50},
                           {"type": "exact_dedup"},
                           {"type": "phash_dedup", "max_distance": 10}]}

    reference = tmp_path / "reference"
    Pipeline.from_config(load_config(config(media_on_s3, reference))).run(progress=False)
    store = tmp_path / "store"
    with FlakyEndpoint(media_on_s3, lambda *request: False, delay_s=0.25) as slow:
        interrupted(tmp_path, config(slow.options, store), store, signal.SIGKILL, spawn)
        kept = rows_in(store)
        assert 0 < kept < len(photos), "the run was not killed midway"
        slow.delay_s = 0.0
        resumed = Pipeline.from_config(load_config(config(slow.options, store))).run(
            progress=False)
    assert resumed.status == "finished" and resumed.rows_processed == len(photos) - kept
    assert table_of(store).equals(table_of(reference))


def test_models_and_heads_in_a_bucket_compute_what_local_ones_do(media_on_s3, tmp_path,
                                                                 monkeypatch):
    """clip_embed, caption (a VLM) and aesthetic_score loading their checkpoints and head
    from the bucket give the columns the same files give from local paths; the run
    records the checkpoint's revision from its listing, a rewritten file changes it, and
    a missing checkpoint fails before any work, naming the key."""
    from curate.config import ConfigError
    from curate.models import file_sha256

    from .conftest import tiny_models

    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    models = tiny_models()
    s3c = client(media_on_s3)
    for name in ("tiny-clip", "tiny-llava"):
        for path in sorted((models / name).iterdir()):
            s3c.upload_file(str(path), BUCKET, f"models/{name}/{path.name}")
    head = models / "tiny-aesthetic.safetensors"
    s3c.upload_file(str(head), BUCKET, f"heads/{head.name}")
    sha = file_sha256(head)

    def config(where: str, store: str) -> dict:
        return {"name": "s3-models", "store": {"uri": str(tmp_path / store)},
                "run": {"executor": "local"},
                "stages": [{"type": "ingest_images", "paths": [str(MEDIA / "photos")]},
                           {"type": "clip_embed", "model": f"{where}/tiny-clip",
                            "text_column": "alt_text", "storage_options": media_on_s3},
                           {"type": "aesthetic_score", "weights": f"{where}/{head.name}",
                            "sha256": sha, "storage_options": media_on_s3},
                           {"type": "caption", "model": f"{where}/tiny-llava",
                            "max_new_tokens": 4, "storage_options": media_on_s3}]}

    def columns(store: str) -> dict:
        table = lancedb.connect(str(tmp_path / store)).open_table("samples").to_arrow()
        table = table.sort_by("uri")
        return {name: table[name].to_pylist() for name in
                ("uri", "clip_embedding", "aesthetic_score", "caption")}

    in_bucket = config(f"s3://{BUCKET}/models", "bucket")
    in_bucket["stages"][2]["weights"] = f"s3://{BUCKET}/heads/{head.name}"
    summary = Pipeline.from_config(load_config(in_bucket)).run(progress=False)
    assert summary.status == "finished"
    assert any("tiny-clip is a" in n and "stand-in" in n for n in summary.notices)
    local = config(str(models), "local")
    local["stages"][2]["weights"] = str(head)
    Pipeline.from_config(load_config(local)).run(progress=False)
    got, want = columns("bucket"), columns("local")
    assert got == want and all(c is not None for c in got["caption"])
    # the weights were read on this node once, into the cache, named by the listing
    copies = sorted(p.name for p in (tmp_path / "cache" / "checkpoints").iterdir()
                    if not p.name.startswith("."))  # the locks
    assert len(copies) == 4 and sum(n.endswith("-config") for n in copies) == 2
    assert (tmp_path / "cache" / "weights" / sha / head.name).read_bytes() == \
        head.read_bytes()

    run = lancedb.connect(str(tmp_path / "bucket")).open_table("samples_runs").to_arrow()
    recorded = {m["stage"]: m["revision"] for m in json.loads(run["models_json"][0].as_py())}
    assert recorded["clip_embed"].startswith("objects:")
    stage = Pipeline.from_config(load_config(in_bucket)).stages[1]
    assert stage.weights_revision == recorded["clip_embed"]
    s3c.put_object(Bucket=BUCKET, Key="models/tiny-clip/tokenizer_config.json",
                   Body=(models / "tiny-clip" / "tokenizer_config.json").read_bytes() + b"\n")
    assert Pipeline.from_config(load_config(in_bucket)).stages[1].weights_revision != \
        recorded["clip_embed"]

    in_bucket["stages"][1]["model"] = f"s3://{BUCKET}/models/none"
    with pytest.raises(ConfigError, match=r"stages\.1\.model: .*models/none holds no objects"):
        Pipeline.from_config(load_config(in_bucket)).run(progress=False)
