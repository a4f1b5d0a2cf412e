"""Config parsing and validation: every mistake is named by key path, before any work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from curate import load_config
from curate.errors import ConfigError

from .conftest import ROOT

GOOD = {
    "name": "t",
    "stages": [
        {"type": "ingest_images", "paths": ["x"]},
        {"type": "image_quality", "min_side": 64},
        {"type": "exact_dedup"},
        {"type": "phash_dedup", "max_distance": 4},
    ],
}


def problems(raw) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    return info.value.problems


def test_demo_config_is_valid():
    config = load_config(ROOT / "configs" / "demo.yaml")
    assert [s.type for s in config.stages] == [
        "ingest_images", "image_quality", "exact_dedup", "phash_dedup", "clip_embed",
        "aesthetic_score", "nsfw_score", "clip_score", "semantic_dedup", "diversity_sample"]
    assert config.store.table == "samples"


def test_gpu_cluster_example_is_valid():
    config = load_config(ROOT / "configs" / "gpu-cluster.yaml")
    types = [s.type for s in config.stages]
    assert types.index("caption") < types.index("semantic_dedup")  # row stages stream first
    assert config.stages[types.index("vlm_score")].criteria["quality"].max == 5


def test_unknown_key_is_named_with_suggestion():
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    raw["stages"][3]["max_distnace"] = 3
    [(path, reason)] = problems(raw)
    assert path == "stages.3.max_distnace"
    assert "did you mean 'max_distance'" in reason


def test_wrong_type_and_range():
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    raw["stages"][1]["min_side"] = "big"
    raw["stages"][3]["max_distance"] = 99
    found = dict(problems(raw))
    assert "stages.1.min_side" in found and "integer" in found["stages.1.min_side"]
    assert "stages.3.max_distance" in found and "16" in found["stages.3.max_distance"]


def test_unknown_stage_type_lists_known_ones():
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    raw["stages"][2]["type"] = "exact_dedupe"
    [(path, reason)] = problems(raw)
    assert path == "stages.2.type"
    assert "did you mean 'exact_dedup'" in reason
    for known in ("ingest_images", "image_quality", "phash_dedup"):
        assert known in reason


def test_reading_a_column_nobody_wrote():
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    raw["stages"][2] = {"type": "exact_dedup", "keep": "highest", "score_column": "aesthetic"}
    [(path, reason)] = problems(raw)
    assert path == "stages.2.score_column"
    assert "'aesthetic'" in reason and "no earlier stage writes" in reason


def test_reading_a_column_written_later_is_refused():
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    raw["stages"][2] = {"type": "exact_dedup", "keep": "highest", "score_column": "blur"}
    raw["stages"][1], raw["stages"][2] = raw["stages"][2], raw["stages"][1]
    [(path, _)] = problems(raw)
    assert path == "stages.1.score_column"


def test_first_stage_must_be_a_source_and_names_unique():
    raw = {"name": "t", "stages": [{"type": "image_quality"}, {"type": "image_quality"}]}
    found = dict(problems(raw))
    assert "stages.0.type" in found
    assert "stages.1.name" in found
    reserved = {"name": "t", "stages": [{"type": "ingest_images", "paths": ["x"]},
                                        {"type": "image_quality", "name": "review"}]}
    assert "reserved for people's verdicts" in dict(problems(reserved))["stages.1.name"]


def test_cross_field_rules():
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    raw["stages"][1]["max_side"] = 10
    raw["stages"][2]["keep"] = "highest"
    found = dict(problems(raw))
    assert "min_side (64) is greater than max_side (10)" in found["stages.1"]
    assert "needs score_column" in found["stages.2"]


def test_top_level_errors():
    found = dict(problems({"stages": [], "store": {"uri": "x", "tabel": "y"}}))
    assert found["stages"].startswith("a non-empty list")
    assert "name" in found
    assert "store.tabel" in found


def test_overrides_set_nested_keys_and_list_items():
    config = load_config(GOOD, ["store.uri=/data/x", "stages.3.max_distance=4",
                                "stages.1.min_side=200", "run.commit_every=5"])
    assert config.store.uri == "/data/x"
    assert config.stages[3].max_distance == 4
    assert config.stages[1].min_side == 200
    assert config.run.commit_every == 5


def test_bad_overrides():
    assert problems_of_override("stages.9.x=1")[0][0] == "stages.9"
    assert "dotted.key=value" in problems_of_override("nonsense")[0][1]
    assert problems_of_override("stages.1.min_side=-3")[0][0] == "stages.1.min_side"


def problems_of_override(item):
    with pytest.raises(ConfigError) as info:
        load_config(GOOD, [item])
    return info.value.problems


def test_config_hash_ignores_run_settings_only():
    a = load_config(GOOD)
    b = load_config(GOOD, ["run.commit_every=3"])
    c = load_config(GOOD, ["stages.1.min_side=65"])
    assert a.config_hash() == b.config_hash() != c.config_hash()


def run_cli(*args, cwd=ROOT, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "curate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_validate_exit_codes(tmp_path):
    ok = run_cli("validate", "configs/demo.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["stages"][1]["min_blurr"] = 3
    bad.write_text(yaml.safe_dump(raw))
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert "stages.1.min_blurr" in result.stderr and "min_blur" in result.stderr
    overridden = run_cli("validate", "configs/demo.yaml", "--set", "stages.3.max_distance=x")
    assert overridden.returncode == 2
    assert "stages.3.max_distance" in overridden.stderr
    missing = run_cli("validate", "nope.yaml")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_cli_run_refuses_bad_config_before_work(tmp_path):
    result = run_cli("run", "configs/demo.yaml", "--set", f"store.uri={tmp_path}/s",
                     "--set", "stages.0.max_pixels=0")
    assert result.returncode == 2
    assert "stages.0.max_pixels" in result.stderr
    assert not (tmp_path / "s").exists()


def test_cli_stages_lists_params_and_columns():
    result = run_cli("stages", "--json")
    assert result.returncode == 0
    import json

    stages = {s["type"]: s for s in json.loads(result.stdout)}
    assert set(stages) >= {"ingest_images", "image_quality", "exact_dedup", "phash_dedup"}
    params = {p["name"]: p for p in stages["phash_dedup"]["params"]}
    assert params["max_distance"]["default"] == "6"
    assert "phash_duplicate_of" in stages["phash_dedup"]["writes"]
    assert "content_hash" in stages["exact_dedup"]["reads"]


def test_cli_stages_prints_brackets_as_written():
    result = run_cli("stages", env_extra={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    assert "vllm (GPU; extra [vllm])" in result.stdout


def test_readme_stage_reference_is_generated_from_code():
    from curate.docs import README_BEGIN, README_END
    from curate.summary import stage_reference_markdown

    text = (ROOT / "README.md").read_text()
    section = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert section.strip() == stage_reference_markdown().strip(), (
        "README stage reference is stale: run `make stages-doc`")
