"""Serve settings and the feature plan, without Ray: what is checked before anything starts."""

from __future__ import annotations

import pytest
import yaml

from curate.config import load_config
from curate.errors import ConfigError
from curate.serve.config import load_serve_config
from curate.serve.features import FeaturePlan

from .conftest import DEMO_MEDIA, ROOT, demo_config


def demo(tmp_path):
    return load_config(demo_config(DEMO_MEDIA, tmp_path / "store"))


def test_the_example_serve_config_is_valid_and_offers_demo_features(tmp_path):
    cfg = load_serve_config(ROOT / "configs" / "serve.yaml")
    assert cfg.host == "127.0.0.1" and cfg.default_model.autoscaling.min_replicas == 0
    plan = FeaturePlan.from_config(demo(tmp_path), cfg.features, also=[cfg.search.column])
    assert set(plan.columns) == set(cfg.features)


def test_features_split_like_the_run_pools(tmp_path):
    plan = FeaturePlan.from_config(demo(tmp_path))
    names = [[s.name for s in segment] for segment in plan.segments]
    assert names == [["clip_embed", "aesthetic_score"], ["nsfw_score", "clip_score"]]
    assert plan.columns["blur"] == -1 and plan.columns["phash"] == -1  # decode pool
    assert plan.columns["clip_embedding"] == 0 and plan.columns["aesthetic_score"] == 0
    assert plan.columns["nsfw_score"] == 1
    assert "quality_reason" not in plan.columns and "error" not in plan.columns  # verdicts
    assert plan.needs(["blur"]) == 0 and plan.needs(["blur", "aesthetic_score"]) == 1
    assert [s.name for s in plan.prepare] == ["clip_embed", "nsfw_score"]
    only_cheap = FeaturePlan.from_config(demo(tmp_path), ["blur"])
    assert only_cheap.segments == [] and only_cheap.prepare == []


def test_unknown_features_and_bad_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="features: caption not computed by any row stage"):
        FeaturePlan.from_config(demo(tmp_path), ["caption"])
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump({"prot": 80, "limits": {"max_upload_bytes": 0},
                                   "token": "short"}))
    with pytest.raises(ConfigError) as error:
        load_serve_config(bad)
    text = str(error.value)
    assert "prot: unknown key (did you mean 'port'?)" in text
    assert "limits.max_upload_bytes" in text and "token" in text
    with pytest.raises(ConfigError, match="does not exist"):
        load_serve_config(tmp_path / "missing.yaml")
