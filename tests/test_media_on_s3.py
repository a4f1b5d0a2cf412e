"""Media in object storage: objects listed page by page and read through the store's
options, globs and prefixes, the errors a user can act on, and a run over a bucket giving
the verdicts the same files give from a local folder (moto's S3 server on loopback,
checking signatures)."""

from __future__ import annotations

import shutil

import boto3
import lancedb
import pytest

from curate import Pipeline, load_config
from curate.errors import RunError
from curate.media import objstore
from curate.media.decode import MediaError
from curate.stages.image.ingest_images import IngestImages

from .conftest import BUCKET, ROOT

MEDIA = ROOT / "examples" / "media"
#: The demo's folders (the tar shard aside: shards are read from local paths for now).
FOLDERS = ("photos", "variants", "low_quality", "broken", "odd")


def client(options):
    return boto3.client("s3", endpoint_url=options["aws_endpoint"], region_name="us-east-1",
                        aws_access_key_id=options["aws_access_key_id"],
                        aws_secret_access_key=options["aws_secret_access_key"])


@pytest.fixture(scope="module")
def media_on_s3(s3):
    """The demo's folders uploaded under media/ (and 12 small objects under small/)."""
    s3c = client(s3)
    for folder in FOLDERS:
        for path in sorted((MEDIA / folder).iterdir()):
            s3c.upload_file(str(path), BUCKET, f"media/{folder}/{path.name}")
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
    files, prefixes = objstore.list_level(f"s3://{BUCKET}/small/", options)
    assert files == [] and prefixes == [f"s3://{BUCKET}/small/a", f"s3://{BUCKET}/small/b"]
    assert objstore.read(f"s3://{BUCKET}/small/a/04.bin", options, 100) == bytes([4]) * 5
    with pytest.raises(MediaError, match="too_large"):
        objstore.read(f"s3://{BUCKET}/small/a/04.bin", options, 4)


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


def test_a_run_over_a_bucket_decides_as_over_a_local_folder(ray_session, media_on_s3,
                                                            tmp_path):
    """The same files, from the bucket and from a local copy: the same rows, hashes and
    verdicts (the uris aside)."""
    local = tmp_path / "media"
    for folder in FOLDERS:
        shutil.copytree(MEDIA / folder, local / folder)

    def run(paths, store):
        raw = {"name": "s3-media", "store": {"uri": str(store)},
               "run": {"executor": "local"},
               "stages": [{"type": "ingest_images", "paths": paths,
                           "storage_options": media_on_s3},
                          {"type": "image_quality", "min_side": 128, "min_blur": 10},
                          {"type": "exact_dedup"},
                          {"type": "phash_dedup", "max_distance": 8}]}
        assert Pipeline.from_config(load_config(raw)).run(progress=False).status == \
            "finished"
        rows = lancedb.connect(str(store)).open_table("samples").to_arrow().to_pylist()
        names = {r["sample_id"]: r["uri"].split("media/", 1)[1] for r in rows}
        keep = ("content_hash", "width", "height", "format", "error", "quality_reason")
        parent = {r["sample_id"]: r["duplicate_of"] for r in rows if r["duplicate_of"]}

        def root(sample_id):
            while sample_id in parent:
                sample_id = parent[sample_id]
            return sample_id

        groups: dict[str, set] = {}
        for r in rows:
            groups.setdefault(root(r["sample_id"]), set()).add(names[r["sample_id"]])
        # which copy of identical files is kept follows the sample_ids, made from the uris
        kept = {frozenset(g): sum(r["selected"] for r in rows
                                  if names[r["sample_id"]] in g) for g in groups.values()}
        return {names[r["sample_id"]]: {k: r[k] for k in keep} for r in rows}, kept

    from_bucket, bucket_groups = run([f"s3://{BUCKET}/media/"], tmp_path / "s3-store")
    from_disk, disk_groups = run([str(local)], tmp_path / "local-store")
    assert from_bucket == from_disk and bucket_groups == disk_groups
    assert any(r["error"] for r in from_bucket.values())
    assert any(len(g) > 1 for g in bucket_groups)
