"""A stage from another package, registered through the `curate.stages` entry-point group:
an installed distribution (its package and `*.dist-info` written here) that `curate stages`
lists and `curate run` runs after ingest_images. Each check runs in a fresh process with the
plugin on PYTHONPATH, as an installed plugin would be found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lance
import pytest
import yaml
from PIL import Image

PLUGIN = '''
"""A plugin stage: each image's area, with an optional minimum."""

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.stage import RowStage, StageParams


class AreaParams(StageParams):
    min_area: int | None = Field(None, ge=0, description="drop images with fewer pixels")


class PixelArea(RowStage):
    """Width times height of each image as `pixel_area`, with an optional minimum."""

    # no `type`: the registry names it after its entry point
    Params = AreaParams
    verdict_column = "pixel_area_reason"

    def reads(self):
        return ("width", "height")

    def writes(self):
        return {"pixel_area": pa.int64(), "pixel_area_reason": pa.string()}

    def process(self, batch, images):
        area = pc.multiply(pc.cast(batch["width"], pa.int64()),
                           pc.cast(batch["height"], pa.int64()))
        limit = self.params.min_area
        reasons = [None if limit is None or a is None or a >= limit else f"area {a} < {limit}"
                   for a in area.to_pylist()]
        return {"pixel_area": area, "pixel_area_reason": pa.array(reasons, pa.string())}
'''

#: Sizes of the images the run reads (one more file is not an image).
SIZES = {"wide.png": (120, 40), "tall.jpg": (36, 90), "square.png": (64, 64),
         "tiny.jpg": (12, 10)}
MIN_AREA = 3000


@pytest.fixture()
def plugin_path(tmp_path) -> Path:
    """A directory holding the plugin package and its distribution's metadata."""
    site = tmp_path / "site"
    package = site / "curate_area_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "stages.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "curate_area_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: curate-area-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[curate.stages]\npixel_area = curate_area_plugin.stages:PixelArea\n")
    return site


def run_python(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_the_plugin_type_resolves_without_ray_or_any_built_in_stage(plugin_path, tmp_path):
    code = textwrap.dedent("""
        import json, sys
        import curate.stage, curate.registry
        from curate.registry import get_stage_class, stage_type_names

        def stage_modules():
            return sorted(m for m in sys.modules if m.startswith("curate.stages."))

        cls = get_stage_class("pixel_area")
        found = {"type": cls.type, "module": cls.__module__, "ray": "ray" in sys.modules,
                 "names": stage_type_names(), "stage_modules": stage_modules()}
        get_stage_class("image_quality")
        found["after_image_quality"] = stage_modules()
        print(json.dumps(found))
    """)
    found = json.loads(run_python(["-c", code], plugin_path, tmp_path).stdout)
    assert found["type"] == "pixel_area"
    assert found["module"] == "curate_area_plugin.stages"
    assert found["ray"] is False
    assert found["stage_modules"] == []
    assert {"pixel_area", "ingest_images", "phash_dedup"} <= set(found["names"])
    # a built-in type is its own module, imported alone
    assert found["after_image_quality"] == ["curate.stages.image",
                                            "curate.stages.image.image_quality"]


def test_curate_stages_lists_the_plugin(plugin_path, tmp_path):
    listed = json.loads(run_python(["-m", "curate", "stages", "--json"], plugin_path,
                                   tmp_path).stdout)
    by_type = {s["type"]: s for s in listed}
    assert "pixel_area" in by_type and "ingest_images" in by_type
    area = by_type["pixel_area"]
    assert area["reads"] == ["width", "height"]
    assert set(area["writes"]) >= {"pixel_area", "pixel_area_reason"}
    assert [p["name"] for p in area["params"]] == ["min_area"]


def test_curate_run_runs_the_plugin_after_ingest(plugin_path, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for n, (name, size) in enumerate(SIZES.items()):
        Image.new("RGB", size, (40 * n, 90, 200 - 40 * n)).save(media / name)
    (media / "broken.jpg").write_bytes(b"not an image")
    store = tmp_path / "store"
    config = {"name": "plugin", "store": {"uri": str(store)}, "run": {"executor": "local"},
              "stages": [{"type": "ingest_images", "paths": [str(media)]},
                         {"type": "pixel_area", "min_area": MIN_AREA}]}
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "summary.json"
    run_python(["-m", "curate", "run", str(path), "--no-progress", "--json", str(out)],
               plugin_path, tmp_path)
    assert json.loads(out.read_text())["executor"] == "local"

    table = lance.dataset(str(store / "samples.lance")).to_table()
    rows = {Path(r["uri"]).name: r for r in table.to_pylist()}
    assert set(rows) == {*SIZES, "broken.jpg"}
    for name in SIZES:
        with Image.open(media / name) as img:  # PIL's own reading of the file's size
            width, height = img.size
        row = rows[name]
        assert row["pixel_area"] == width * height
        small = width * height < MIN_AREA
        assert row["pixel_area_reason"] == (f"area {width * height} < {MIN_AREA}" if small
                                            else None)
        assert row["selected"] is not small
    assert rows["broken.jpg"]["pixel_area"] is None
    assert rows["broken.jpg"]["error"] and rows["broken.jpg"]["selected"] is False


# --- the registry's own checks ----------------------------------------------------------------


def test_each_built_in_type_is_a_file_named_for_it():
    from curate.registry import BUILTIN, get_stage_class

    root = Path(__file__).resolve().parent.parent
    for name, path in BUILTIN.items():
        module, _, _ = path.partition(":")
        package, _, file = module.rpartition(".")
        assert file == name and package.rpartition(".")[2] in ("image", "video", "table")
        assert (root / (module.replace(".", "/") + ".py")).is_file()
        assert get_stage_class(name).type == name


def test_a_class_registered_under_another_type_is_refused(monkeypatch):
    from curate import registry

    monkeypatch.setitem(registry.BUILTIN, "not_quality",
                        "curate.stages.image.image_quality:ImageQuality")
    with pytest.raises(ValueError, match=r"not_quality.*'image_quality'"):
        registry.get_stage_class("not_quality")
    assert "not_quality" not in registry._STAGES
    with pytest.raises(KeyError):
        registry.get_stage_class("no_such_stage")
