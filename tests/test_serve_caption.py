"""On-demand captions: a pipeline with a VLM caption stage hosted by `curate serve`."""

from __future__ import annotations

from pathlib import Path

import lancedb
import pyarrow as pa
import pytest
import requests
import yaml

from curate.media.decode import decode_image
from curate.stages.image.caption import Caption

from .conftest import copy_store, serve_settings, tiny_models

CAPTION = {"type": "caption", "model": None, "max_new_tokens": 6, "device": "cpu",
           "prompt": "The alt text says: {alt_text}. Write a caption."}


@pytest.fixture(scope="module")
def captioned(ray_session, demo_store, tmp_path_factory):
    from curate.serve.config import load_serve_config
    from curate.serve.server import start, stop

    root = tmp_path_factory.mktemp("caption")
    store = copy_store(demo_store, root / "store")
    stage = {**CAPTION, "model": str(tiny_models() / "tiny-llava")}
    pipeline = root / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "captions", "store": {"uri": str(store)},
        "stages": [{"type": "ingest_images", "paths": [str(root)]}, stage]}))
    # the model scales to zero two seconds after its last request
    hosting = {"cpus": 0.1, "autoscaling": {"min_replicas": 0, "max_replicas": 1,
                                            "downscale_delay_s": 2}}
    url = start(load_serve_config(serve_settings(store, pipeline=str(pipeline),
                                                 default_model=hosting)))
    yield url, store, stage
    stop()


def test_caption_on_demand_is_the_stage_output_and_fills_the_row(captioned):
    url, store, stage = captioned
    table = lancedb.connect(str(store)).open_table("samples")
    row = next(r for r in table.to_arrow().to_pylist() if r["uri"].endswith("flower.jpg"))
    offered = requests.get(url + "/features", timeout=60).json()["features"]
    assert offered == {"caption": "string", "caption_error": "string"}
    got = requests.post(url + "/features", data={"sample_id": row["sample_id"],
                                                 "text": "an orange dahlia"},
                        timeout=300).json()
    assert got["computed"] == ["caption", "caption_error"]
    # the same stage run by hand on the same decoded image gives the same text
    direct = Caption(**{k: v for k, v in stage.items() if k != "type"})
    image = decode_image(Path(row["uri"]).read_bytes(), 64_000_000, 1024).image
    batch = pa.table({"sample_id": ["x"], "alt_text": ["an orange dahlia"]})
    batch = batch.append_column(direct.prepared_column, direct.prepare(batch, [image]))
    direct.setup()
    expected = direct.process(batch, None)
    assert got["features"]["caption"] == expected["caption"][0].as_py()
    assert got["features"]["caption_error"] == expected["caption_error"][0].as_py()
    # cached into the row: the table gained the column
    fresh = lancedb.connect(str(store)).open_table("samples")
    stored = fresh.search().where(f"sample_id = '{row['sample_id']}'").to_arrow()
    assert "caption" in fresh.schema.names
    assert stored["caption"][0].as_py() == got["features"]["caption"]


def model_replicas() -> int:
    from ray import serve

    deployments = serve.status().applications["curate"].deployments
    return sum(n for name, d in deployments.items() if name.startswith("model-")
               for n in d.replica_states.values())


def test_an_idle_model_scales_to_zero_and_the_next_request_is_answered(captioned):
    import time

    url, store, _ = captioned
    table = lancedb.connect(str(store)).open_table("samples").to_arrow().to_pylist()
    first, second = (next(r for r in table if r["uri"].endswith(name))
                     for name in ("coffee.jpg", "astronaut.jpg"))
    answer = requests.post(url + "/features", data={"sample_id": first["sample_id"]},
                           timeout=300)
    assert answer.status_code == 200 and answer.json()["computed"], answer.text
    deadline = time.monotonic() + 180
    while model_replicas() > 0:
        assert time.monotonic() < deadline, "the idle model never scaled to zero"
        time.sleep(0.5)
    cold = requests.post(url + "/features", data={"sample_id": second["sample_id"]},
                         timeout=300)  # a replica has to start first
    assert cold.status_code == 200, cold.text
    assert cold.json()["computed"] == ["caption", "caption_error"]
    assert cold.json()["features"]["caption"]


def test_without_a_clip_stage_search_says_what_is_missing(captioned):
    url = captioned[0]
    response = requests.get(url + "/search", params={"text": "a flower"}, timeout=60)
    assert response.status_code == 404 and "clip_embed" in response.json()["error"]
