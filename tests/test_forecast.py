"""`curate plan`: the sample, the cluster option, a plan of the whole corpus against the
run it projects, and a declared-GPU cluster's bottleneck."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lancedb
import pytest
import yaml

from curate.config import load_config
from curate.errors import ConfigError
from curate.forecast import Cluster, sample_inputs
from curate.plan import build_stages

from .conftest import ROOT, demo_config, gpu_cluster_config


def _curate(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _source(paths: list[str]):
    config = load_config({"name": "s", "stages": [{"type": "ingest_images", "paths": paths}]})
    return build_stages(config)[0]


def test_cluster_option():
    assert Cluster.parse("cpus=64,gpus=16,nodes=2") == Cluster(64, 16, 2, True)
    assert Cluster.parse("cpus=8") == Cluster(8, 0, 1, True)
    for bad, why in (("cpus=8,tpus=2", "'tpus=2': give cpus=N,gpus=N,nodes=N"),
                     ("cpus=x", "cpus='x' is not a number"),
                     ("gpus=4", "cpus=N (more than 0) is required"),
                     ("cpus=4,gpus=-1", "gpus must be a number, 0 or more"),
                     ("cpus=nan", "cpus must be a number, 0 or more"),
                     ("cpus=4,nodes=2.5", "nodes=2.5: give a whole number, 1 or more")):
        with pytest.raises(ConfigError, match="--cluster") as caught:
            Cluster.parse(bad)
        assert why in str(caught.value)


def test_a_declared_cluster_that_cannot_hold_the_gpu_workers_is_refused_before_any_work(
        tmp_path):
    raw = gpu_cluster_config(tmp_path / "store")
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    told = _curate("plan", str(path), "--target", "1000", "--cluster", "cpus=64,gpus=0",
                   timeout=120)
    assert told.returncode == 2
    assert "stages.4.resources.gpus: clip_embed asks for GPUs, but the cluster has none" in \
        told.stderr
    assert not (tmp_path / "store" / "samples.lance").exists()  # nothing ran


def test_the_table_written_at_scale_predicts_a_real_tables_bytes(tmp_path):
    """Lance compresses a full page better than a sample's rows: 200 rows written again at
    2,000 (with their indexes) come within 15% of 2,000 real rows of the same kind, where
    the 200 rows' own bytes times 10 do not."""
    import lance
    import numpy as np
    import pyarrow as pa

    from curate.forecast import _dataset_bytes, scaled_bytes

    rng = np.random.default_rng(0)
    n = 2000
    ids = [f"{x:016x}" for x in rng.integers(0, 2**63, n)]
    table = pa.table({
        "sample_id": ids,
        "uri": [f"s3://bucket/crawl/part-{i // 500:05d}/img_{i:07d}.jpg" for i in range(n)],
        "content_hash": [f"{x:032x}" for x in rng.integers(0, 2**63, n)],
        "score": rng.random(n).astype(np.float32),
        "num_bytes": rng.integers(10_000, 900_000, n),
        "reason": [None if x > 0.2 else "blur" for x in rng.random(n)],
        "stamp": ["3f2a9c/77aa"] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(rng.random(n * 16).astype(np.float32)), 16),
    })

    def written(rows: pa.Table, name: str):
        ds = lance.write_dataset(rows, str(tmp_path / name))
        for column in ("sample_id", "score"):
            ds.create_scalar_index(column, "BTREE")
        return lance.dataset(str(tmp_path / name))

    actual = _dataset_bytes(written(table, "real.lance"))
    sample = written(table.take(rng.choice(n, 200, replace=False)), "sample.lance")

    predicted, rows = scaled_bytes(sample.to_table(), sample.describe_indices(), n,
                                   tmp_path / "scaled.lance")
    assert rows == n and abs(predicted / actual - 1) <= 0.15, (predicted, actual)
    assert _dataset_bytes(sample) * 10 / actual - 1 > 0.15  # the naive way is off
    assert not (tmp_path / "scaled.lance").exists()


def test_the_sample_is_seeded_uniform_and_lists_only_what_it_needs(tmp_path):
    """30 directories of 4 files: a sample of 3 lists ten times that (8 directories, in a
    seeded order), not all 30; the same seed gives the same sample; over many seeds every
    file of one directory is chosen about equally often."""
    for d in range(30):
        folder = tmp_path / "many" / f"d{d:02d}"
        folder.mkdir(parents=True)
        for f in range(4):
            (folder / f"{f}.jpg").write_bytes(b"x" * (d + 1))
    source = _source([str(tmp_path / "many")])
    sample = sample_inputs(source, 3, seed=1)
    assert sample.listing.num_rows == 3 and len(set(sample.listing["input_id"].to_pylist())) == 3
    assert sample.units == 30 and sample.units_listed == 8 and sample.listed == 32
    assert sample_inputs(source, 3, seed=1).listing["uri"].to_pylist() == \
        sample.listing["uri"].to_pylist()
    assert sorted(sample.input_bytes) == sorted(
        Path(u).stat().st_size for u in sample.listing["uri"].to_pylist())

    flat = tmp_path / "flat"
    flat.mkdir()
    for f in range(20):
        (flat / f"{f:02d}.jpg").write_bytes(b"y")
    source = _source([str(flat)])
    chosen = Counter(uri for seed in range(400)
                     for uri in sample_inputs(source, 5, seed).listing["uri"].to_pylist())
    assert len(chosen) == 20  # every file: 100 times each expected, sd about 8.7
    assert all(55 <= n <= 145 for n in chosen.values()), chosen


def test_a_plan_of_the_whole_corpus_matches_the_run_it_projects(tmp_path):
    """Sampling every input, the plan's projected funnel is the real run's line for line
    and its table size is within 15% of the real table's (an oracle run on its own, into
    its own store); on that existing table the plan says what `curate run --plan` says a
    rerun computes (nothing), and the plan's runs leave the table as it was."""
    from curate.config import StoreConfig
    from curate.forecast import table_bytes
    from curate.table.store import Store

    store = tmp_path / "store"
    raw = demo_config(ROOT / "examples" / "media", store)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(raw))
    ran = _curate("run", str(path), "--no-progress", "--json", str(tmp_path / "run.json"))
    assert ran.returncode == 0, ran.stderr[-3000:]
    real = json.loads((tmp_path / "run.json").read_text())
    version = lancedb.connect(str(store)).open_table("samples").version

    out, page = tmp_path / "plan.json", tmp_path / "plan.html"
    planned = _curate("plan", str(path), "--sample", "1000", "--json", str(out),
                      "--html", str(page))
    assert planned.returncode == 0, planned.stderr[-3000:]
    plan = json.loads(out.read_text())
    assert plan["sample"]["inputs"] == plan["target_inputs"] == real["rows_total"] == 33
    assert [(s["name"], s["rows_in"], s["kept"]) for s in plan["stages"]] == \
        [(s["name"], s["rows_in"], s["kept"]) for s in real["stages"]]
    assert plan["rows"] == real["rows_total"] and plan["selected"] == real["selected"]
    actual = table_bytes(Store(StoreConfig(uri=str(store), table="samples")))
    assert abs(plan["table_bytes"]["estimate"] / actual - 1) <= 0.15, (plan["table_bytes"],
                                                                       actual)
    assert plan["table_bytes"]["low"] <= plan["table_bytes"]["estimate"] <= \
        plan["table_bytes"]["high"]
    wall = plan["wall_seconds"]
    assert 0 < wall["fixed"] < wall["estimate"] and wall["low"] <= wall["estimate"]
    assert set(plan["fixed_seconds"]) == {"process", "start", "workers_and_models", "finish"}
    assert plan["bottleneck"]["stage"] in {s["name"] for s in plan["stages"]}
    # the rerun: what `curate run --plan` says, costed
    told = _curate("run", str(path), "--plan", "--json", str(tmp_path / "rerun.json"))
    assert told.returncode == 0, told.stderr[-3000:]
    rerun = json.loads((tmp_path / "rerun.json").read_text())
    assert plan["rerun"]["inputs_to_read"] == rerun["inputs"] == 0
    assert [(s["name"], s["rows"]) for s in plan["rerun"]["stages"] if s["rows"]] == \
        [(s["name"], rerun["rows_total"]) for s in rerun["stages"] if s["whole"]]
    assert lancedb.connect(str(store)).open_table("samples").version == version
    text = page.read_text()
    assert text.count("<rect") == 2 * len(plan["stages"]) and "GPU-h" in text
    assert "Wall time:" in planned.stdout and "Bottleneck:" in planned.stdout


def test_a_declared_gpu_cluster_plan_names_the_slowest_pool(tmp_path):
    """configs/gpu-cluster.yaml (stand-in models) planned for 10^8 inputs on 16 declared
    GPUs, from the demo's photos measured on this machine's CPUs: the bottleneck is the
    pool whose busy seconds per input over the workers a run starts it with are the most
    (and the balanced GPU pools fit the GPUs), checked
    against the stages' seconds of a plain run of the same photos; the GPU stages say they
    were measured on CPU and carry GPU-hours."""
    from curate.engine.pools import plan_pools
    from curate.plan import segments
    from curate.stage import GlobalStage, RowStage

    raw = gpu_cluster_config(tmp_path / "store")
    raw["run"] = {"commit_every": 8}
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "plan.json"
    planned = _curate("plan", str(path), "--sample", "11", "--target", "100000000",
                      "--cluster", "cpus=64,gpus=16,nodes=2", "--json", str(out))
    assert planned.returncode == 0, planned.stderr[-3000:]
    plan = json.loads(out.read_text())
    stages = {s["name"]: s for s in plan["stages"]}
    for name in ("clip_embed", "caption", "vlm_score"):
        assert stages[name]["measured_on_cpu"] and stages[name]["gpu_hours"] > 0
    assert stages["image_quality"]["gpu_hours"] == 0
    assert any("measured on its CPUs" in n for n in plan["notes"])

    # the oracle: a plain run's stage seconds, over the workers the cluster's pools get
    plain = dict(raw)
    plain["stages"] = [{**s, "resources": {**s.get("resources", {}), "gpus": 0}}
                       for s in raw["stages"]]
    plain["store"] = {"uri": str(tmp_path / "plain")}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    ran = _curate("run", str(tmp_path / "plain.yaml"), "--no-progress", "--json",
                  str(tmp_path / "run.json"))
    assert ran.returncode == 0, ran.stderr[-3000:]
    seconds = {s["name"]: s["seconds"] for s in json.loads(
        (tmp_path / "run.json").read_text())["stages"]}
    built = build_stages(load_config(path))
    chain = [s for s in built if not isinstance(s, GlobalStage) or isinstance(s, RowStage)]
    sizes = plan_pools(segments(chain), 64, 16, 100_000_000)
    load = {size.stages: sum(seconds[n] for n in size.stages) / size.workers
            for size in sizes}
    slowest = max(load, key=load.get)
    runner_up = sorted(load.values())[-2]
    assert load[slowest] > 2 * runner_up  # far apart: timing noise cannot swap them
    assert tuple(plan["bottleneck"]["pool"]) == slowest
    assert sum(p["balanced_workers"] * p["gpus"] for p in plan["pools"]) <= 16
    assert all(p["balanced_workers"] >= 1 for p in plan["pools"])
    assert plan["bottleneck"]["stage"] in slowest
