"""The store on an object store: run, incremental rerun, the run lease and the Serve app
against a real S3-protocol server (moto's) on loopback, and clear errors for a wrong
bucket or bad credentials."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import requests
import yaml

from curate import Pipeline, load_config

from .conftest import BUCKET, ROOT, serve_settings


def s3_config(media, options: dict, prefix: str = "store") -> dict:
    return {"name": "on-s3",
            "store": {"uri": f"s3://{BUCKET}/{prefix}", "table": "samples",
                      "storage_options": options},
            "run": {"commit_every": 8, "num_cpus": 2},
            "stages": [{"type": "ingest_images", "paths": [str(media)],
                        "resources": {"batch_size": 4}},
                       {"type": "image_quality", "min_side": 64},
                       {"type": "exact_dedup"}, {"type": "phash_dedup"}]}


def test_run_rerun_and_serve_on_an_object_store(ray_session, s3, photo_dir, tmp_path):
    from curate.serve.config import load_serve_config
    from curate.serve.server import start, stop
    from curate.table.store import Store

    media = tmp_path / "media"
    shutil.copytree(photo_dir, media)
    extra = sorted(media.iterdir())[:4]
    held = tmp_path / "held"
    held.mkdir()
    for path in extra:
        path.rename(held / path.name)
    config = load_config(s3_config(media, s3))
    first = Pipeline.from_config(config).run(progress=False)
    assert first.status == "finished" and first.rows_total == 20
    assert first.store_uri == f"s3://{BUCKET}/store"
    for path in extra:
        (held / path.name).rename(media / path.name)
    second = Pipeline.from_config(config).run(progress=False)
    assert second.status == "finished" and second.rows_processed == 4
    assert second.rows_total == 24
    store = Store(config.store)
    assert store.table().count_rows() == 24
    assert [r["status"] for r in store.runs()] == ["finished", "finished"]
    assert Pipeline.from_config(config).run(progress=False).status == "up_to_date"

    settings = serve_settings(tmp_path)
    settings["store"] = {"uri": f"s3://{BUCKET}/store", "table": "samples",
                         "storage_options": s3}
    url = start(load_serve_config(settings))
    try:
        rows = requests.get(url + "/samples", params={"limit": 100}, timeout=60).json()["rows"]
        assert len(rows) == 24
        thumb = requests.get(f"{url}/samples/{rows[0]['sample_id']}/thumbnail", timeout=60)
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    finally:
        stop()


@pytest.mark.parametrize("change,says", [
    ({"uri": "s3://no-such-bucket/store"}, "no-such-bucket"),
    ({"storage_options": {"aws_secret_access_key": "wrong"}}, "credentials"),
])
def test_a_wrong_bucket_or_bad_credentials_fail_in_one_line(s3, photo_dir, tmp_path, change,
                                                            says):
    raw = s3_config(photo_dir, dict(s3), prefix="bad")
    raw["store"]["storage_options"].update(change.get("storage_options", {}))
    raw["store"].update({k: v for k, v in change.items() if k != "storage_options"})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "curate", "run", str(path),
                             "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert says in errors[0] and ".rs:" not in errors[0], errors[0]


def test_of_runs_racing_for_a_lease_on_the_object_store_exactly_one_wins(s3, tmp_path):
    import json

    from .test_faults import race

    outcomes = race(f"s3://{BUCKET}/race", json.dumps(s3))
    assert outcomes == ["holds", "refused", "refused"], outcomes
