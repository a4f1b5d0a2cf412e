"""Shared fixtures: one real local Ray for the whole session, real photos, temp stores."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_MEDIA = ROOT / "examples" / "media"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that runs a pipeline."""
    import ray

    from curate.runner import connect

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """24 photo-like 640x480 JPEGs made from real photos."""
    from curate.sample_media import write_photos

    directory = tmp_path_factory.mktemp("photos")
    write_photos(directory, 24, size=(640, 480), seed=1)
    return directory


@pytest.fixture()
def demo_media(tmp_path) -> Path:
    """A private copy of examples/media (tests may add or change files)."""
    target = tmp_path / "media"
    shutil.copytree(DEMO_MEDIA, target)
    return target


def tiny_models() -> Path:
    """examples/models: the stand-in models the demo uses (built once, as `make` does)."""
    from curate.models.tiny import build_all

    out = ROOT / "examples" / "models"
    if not (out / ".built").is_file():
        build_all(out)
        (out / ".built").touch()
    return out


def demo_config(media: Path, store: Path, **run) -> dict:
    """The demo pipeline as a dict, pointed at `media` and `store`."""
    import yaml

    models = tiny_models()
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for stage in raw["stages"]:
        for key in ("model", "weights"):
            if str(stage.get(key, "")).startswith("examples/models/"):
                stage[key] = str(models / stage[key].removeprefix("examples/models/"))
    raw["stages"][0]["paths"] = [str(media)]
    raw["store"]["uri"] = str(store)
    raw.setdefault("run", {}).update(run)
    return raw
