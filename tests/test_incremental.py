"""Iterating on a config recomputes only what changed: each kind of change against a
table made by a first run, checked two ways: the rows each stage computed (from the runs
table, against what the stored table says must be computed) and the table itself against
a fresh run of the final config."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys
import time

import lancedb
import numpy as np
import pyarrow.compute as pc
import pytest
import yaml
from PIL import Image

from curate.config import load_config
from curate.engine.run import plan_run
from curate.pipeline import Pipeline

from .conftest import ROOT, demo_config, kill_family
from .helpers import assert_same_table

CAPTION = {"type": "caption", "max_new_tokens": 4}


def base_config(media, store, executor="local") -> dict:
    raw = demo_config(media, store, executor=executor)
    stages = [s for s in raw["stages"] if s["type"] not in ("clip_score", "semantic_dedup")]
    models = ROOT / "examples" / "models"
    stages.insert(-1, {**CAPTION, "model": str(models / "tiny-llava")})
    raw["stages"] = stages
    return raw


def stage_of(raw: dict, kind: str) -> dict:
    return next(s for s in raw["stages"] if s["type"] == kind)


def run(raw: dict):
    return Pipeline.from_config(load_config(raw)).run(progress=False)


def table_of(store, name="samples"):
    return lancedb.connect(str(store)).open_table(name).to_arrow().sort_by("sample_id")


def last_run(store) -> dict:
    runs = lancedb.connect(str(store)).open_table("samples_runs").to_arrow().to_pylist()
    return {s["name"]: s for s in json.loads(runs[-1]["stages_json"])}


def computed(store) -> dict[str, int]:
    return {name: s["rows_computed"] for name, s in last_run(store).items()}


def alive_for_caption(table, verdicts=("error", "quality_reason", "aesthetic_reason",
                                        "nsfw_reason")) -> np.ndarray:
    """Rows the captioner must see: no earlier row stage dropped them."""
    alive = np.ones(table.num_rows, bool)
    for column in verdicts:
        alive &= pc.is_null(table[column]).to_numpy(zero_copy_only=False)
    return alive


@pytest.fixture(scope="module")
def first(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    shutil.copytree(ROOT / "examples" / "media", root / "media")
    raw = base_config(root / "media", root / "store")
    assert run(raw).status == "finished"
    return root, raw


def again(first, tmp_path, change, executor="local"):
    """`change(raw)` run on a copy of the first run's table, and the same config run fresh."""
    root, raw = first
    store = tmp_path / "store"
    shutil.copytree(root / "store", store)
    before = table_of(store)
    raw = copy.deepcopy(raw)
    raw["run"]["executor"] = executor
    change(raw)
    raw["store"]["uri"] = str(store)
    planned = plan_run(load_config(raw)).stages
    summary = run(raw)
    assert summary.status == "finished"
    done = {s.name: s for s in summary.stages}
    for stage in planned:  # the plan said what the run then did
        if not stage.whole:
            assert (stage.computed, stage.verdicts) == (
                done[stage.name].rows_computed, done[stage.name].verdicts_redecided), stage
    fresh = copy.deepcopy(raw)
    fresh["store"]["uri"] = str(tmp_path / "fresh")
    fresh["run"]["executor"] = "local"  # the same table as on Ray (test_resume)
    run(fresh)
    after = table_of(store)
    assert_same_table(after, table_of(tmp_path / "fresh"), raw)
    return before, after, computed(store), summary


def test_a_threshold_decides_verdicts_again_and_computes_nothing(first, tmp_path):
    def tighter(raw):
        stage_of(raw, "image_quality")["min_blur"] = 200
        stage_of(raw, "nsfw_score")["max_score"] = 0.5

    before, after, done, summary = again(first, tmp_path, tighter)
    assert summary.rows_processed == 0
    for stage in ("ingest_images", "image_quality", "clip_embed", "aesthetic_score",
                  "nsfw_score", "caption"):
        assert done[stage] == 0, stage
    counts = {s.name: s for s in summary.stages}
    assert counts["image_quality"].verdicts_redecided == before.num_rows
    assert not pc.all(pc.equal(before["quality_reason"].fill_null(""),
                               after["quality_reason"].fill_null(""))).as_py()
    # the captions of rows dropped now stay (history), not recomputed
    assert after["caption"].equals(before["caption"])


def test_a_looser_threshold_computes_the_rows_it_brings_back_and_only_them(first, tmp_path):
    def looser(raw):
        stage_of(raw, "image_quality").pop("min_blur")

    before, after, done, _ = again(first, tmp_path, looser)
    back = alive_for_caption(after) & ~alive_for_caption(before)
    assert back.sum() > 0, "no row came back: the test proves nothing"
    assert done["caption"] == back.sum()
    assert done["clip_embed"] == done["nsfw_score"] == done["image_quality"] == 0


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_new_prompt_recomputes_only_the_captioner_on_rows_alive(first, tmp_path, executor):
    def prompt(raw):
        stage_of(raw, "caption")["prompt"] = "Name the main object."

    _, after, done, _ = again(first, tmp_path, prompt, executor)
    assert done["caption"] == alive_for_caption(after).sum()
    assert sum(n for stage, n in done.items()
               if stage not in ("caption", "exact_dedup", "phash_dedup",
                                "diversity_sample")) == 0


def test_a_new_stage_computes_only_itself(first, tmp_path):
    def score(raw):
        raw["stages"].insert(-1, {"type": "vlm_score", "model": stage_of(raw, "caption")["model"],
                                  "max_new_tokens": 6, "criteria": {"quality": {}}})

    before, after, done, _ = again(first, tmp_path, score)
    assert "vlm_score" not in before.column_names
    assert done["vlm_score"] == alive_for_caption(after).sum()
    assert done["caption"] == done["clip_embed"] == done["image_quality"] == 0


def test_a_removed_stage_keeps_its_columns_and_drops_its_verdict(first, tmp_path):
    def without(raw):
        raw["stages"] = [s for s in raw["stages"] if s["type"] != "image_quality"]

    before, after, done, _ = again(first, tmp_path, without)
    assert after["blur"].equals(before["blur"])  # history
    assert "image_quality" not in done
    assert not any((r or "").startswith("image_quality") for r in
                   after["reject_reason"].to_pylist())
    back = alive_for_caption(after, ("error", "aesthetic_reason", "nsfw_reason")) \
        & ~alive_for_caption(before)
    assert done["caption"] == back.sum()


def test_plan_says_what_each_change_would_compute(first, tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    root, raw = first
    store = tmp_path / "store"
    shutil.copytree(root / "store", store)
    raw = copy.deepcopy(raw)
    raw["store"]["uri"] = str(store)
    assert all(not s.computed and not s.verdicts for s in plan_run(load_config(raw)).stages)

    stage_of(raw, "image_quality").pop("min_blur")
    stage_of(raw, "caption")["max_new_tokens"] = 5
    version = lancedb.connect(str(store)).open_table("samples").version
    planned = {s.name: s for s in plan_run(load_config(raw)).stages}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    shown = CliRunner().invoke(app, ["run", str(path), "--plan"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert f"changed params {planned['caption'].why['changed params']}" in shown.output
    assert "Nothing was computed or written" in shown.output
    assert lancedb.connect(str(store)).open_table("samples").version == version
    before = table_of(store)
    assert planned["image_quality"].verdicts == before.num_rows
    assert planned["image_quality"].computed == 0
    run(raw)
    after = table_of(store)
    back = alive_for_caption(after) & ~alive_for_caption(before)
    stay = alive_for_caption(after) & alive_for_caption(before)
    assert back.sum() and stay.sum()
    assert planned["caption"].why == {"changed params": stay.sum(),
                                      "skipped before, alive now": back.sum()}
    assert planned["caption"].computed == computed(store)["caption"]
    assert sum(s.computed for s in planned.values() if not s.whole) == \
        planned["caption"].computed


def test_kill_9_in_an_incremental_run_resumes_to_the_same_table(first, tmp_path, spawn):
    root, raw = first
    store = tmp_path / "store"
    shutil.copytree(root / "store", store)
    raw = copy.deepcopy(raw)
    raw["store"]["uri"] = str(store)
    stage_of(raw, "caption")["prompt"] = "Say what you see."
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = spawn([sys.executable, "-m", "curate", "run", str(path), "--no-progress"],
                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = lancedb.connect(str(store))
    deadline = time.monotonic() + 120
    while runs.open_table("samples_runs").count_rows() < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    family = spawn.family(proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    kill_family(proc, family)
    records = runs.open_table("samples_runs").to_arrow().to_pylist()
    assert max(records, key=lambda r: r["started_at"])["status"] == "running"  # cut off
    assert run(raw).status == "finished"
    fresh = copy.deepcopy(raw)
    fresh["store"]["uri"] = str(tmp_path / "fresh")
    run(fresh)
    assert_same_table(table_of(store), table_of(tmp_path / "fresh"), raw)


def video_demo(store) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "video-demo.yaml").read_text())
    for stage in raw["stages"]:
        for key in ("paths", "model", "weights"):
            value = stage.get(key)
            if isinstance(value, list):
                stage[key] = [str(ROOT / v) for v in value]
            elif isinstance(value, str) and value.startswith("examples/"):
                stage[key] = str(ROOT / value)
    raw["store"]["uri"] = str(store)
    raw["run"]["executor"] = "local"
    return raw


@pytest.mark.parametrize("where", ["beside clip_embed", "last"])
def test_clips_are_read_again_by_their_span_not_their_videos_whole(ray_session, tmp_path,
                                                                   where):
    """A new stage on clips and clips brought back by a looser threshold: each clip's
    sampled frames are decoded again from its span (no video is cut again), a new image
    stage sees each frame as a row and keeps one value per clip, the captioner (which
    skips dropped clips) computes only the clips that came back, and the table is the one
    a fresh run makes. aesthetic_score reads clip_embed's embeddings: beside it, in its
    pool, those of each frame (computed again); last, in another pool, the clip's mean."""
    raw = video_demo(tmp_path / "store")
    if where == "last":
        stage = stage_of(raw, "aesthetic_score")
        raw["stages"].remove(stage)
        raw["stages"].insert(raw["stages"].index(stage_of(raw, "vlm_score")) + 1, stage)
    aesthetic = stage_of(raw, "aesthetic_score")
    position = raw["stages"].index(aesthetic)
    first = copy.deepcopy(raw)
    first["stages"].remove(aesthetic)
    run(first)
    before = table_of(tmp_path / "store", "clips")
    stage_of(raw, "motion_score").pop("min_score")
    assert raw["stages"][position] == aesthetic
    planned = {s.name: s for s in plan_run(load_config(raw)).stages}
    summary = run(raw)
    after = table_of(tmp_path / "store", "clips")
    assert summary.rows_processed == 0  # no video was read whole
    counts = {s.name: s for s in summary.stages}
    for name, stage in planned.items():  # the plan said what the run then did
        assert stage.whole or (stage.computed, stage.verdicts) == (counts[name].rows_computed,
                                                    counts[name].verdicts_redecided), name
    came_back = pc.is_valid(before["motion_reason"]).to_numpy(zero_copy_only=False)
    assert came_back.sum(), "no clip was dropped by motion: the test proves nothing"
    assert counts["motion_score"].verdicts_redecided == before.num_rows
    assert counts["aesthetic_score"].rows_computed == after.num_rows  # a new stage: all
    assert pc.sum(pc.is_valid(after["aesthetic_score"])).as_py() >= came_back.sum()
    alive = alive_for_caption(after, ("error", "motion_reason", "quality_reason", "nsfw_reason")
                              + (("aesthetic_reason",) if where != "last" else ()))
    assert 0 < counts["caption"].rows_computed == (alive & came_back).sum()
    assert counts["clip_embed"].rows_computed == 0
    fresh = copy.deepcopy(raw)
    fresh["store"]["uri"] = str(tmp_path / "fresh")
    run(fresh)
    assert_same_table(after, table_of(tmp_path / "fresh", "clips"), raw)


def test_a_stage_that_reads_frames_columns_stamps_where_it_reads_them(tmp_path):
    """On clips, aesthetic_score beside clip_embed reads each frame's embedding; moved
    past another pool it reads the clip's mean: other values, another stamp. On images
    the two places read the same values and stamp alike."""
    from curate.plan import build_stages, stamps

    def stamp_of(raw):
        return stamps(build_stages(load_config(raw)))["aesthetic_score"]

    def moved_last(raw):
        raw = copy.deepcopy(raw)
        stage = stage_of(raw, "aesthetic_score")
        raw["stages"].remove(stage)
        raw["stages"].insert(raw["stages"].index(stage_of(raw, "nsfw_score")) + 1, stage)
        return raw

    clips = video_demo(tmp_path / "clips")
    assert stamp_of(clips) != stamp_of(moved_last(clips))
    images = base_config(ROOT / "examples" / "media", tmp_path / "images")
    assert stamp_of(images) == stamp_of(moved_last(images))


def test_thresholds_are_left_out_of_what_computes_the_rows():
    """Every threshold param of every score filter changes only the VERDICT part of its
    stamp (the ROW part decides whether its scores are computed again)."""
    from curate.plan import stamps
    from curate.registry import stage_types
    from curate.stage import ScoreFilter

    models = ROOT / "examples" / "models"
    needs = {"aesthetic_score": {"weights": str(models / "tiny-aesthetic.safetensors"),
                                 "sha256": "a7dcec5e39fdfd39452c466904035a155376b4be761ce794d"
                                           "54fc6257fbc5740"},
             "vlm_score": {"model": str(models / "tiny-llava"), "criteria": {"q": {}}}}
    filters = [t for t, cls in stage_types().items() if issubclass(cls, ScoreFilter)]
    assert {"image_quality", "aesthetic_score", "nsfw_score", "vlm_score",
            "motion_score"} <= set(filters)

    def stamp(kind: str, **params) -> str:
        from curate.stages import IngestImages, IngestVideos, SplitClips

        chain = [IngestVideos(paths=["x"]), SplitClips()] if kind == "motion_score" \
            else [IngestImages(paths=["x"])]
        stage = stage_types()[kind](**needs.get(kind, {}), **params)
        return stamps([*chain, stage])[kind]

    for kind in filters:
        cls = stage_types()[kind]
        assert cls.threshold_params, kind
        plain = stamp(kind)
        for param in cls.threshold_params:
            moved = stamp(kind, **{param: 1})
            assert moved.split("/")[0] == plain.split("/")[0], (kind, param)
            assert moved != plain, (kind, param)


def test_rows_brought_back_are_computed_by_every_stage_after_and_a_changed_file_is_read_again(
        ray_session, tmp_path):
    """A stage that reads a column a skipping stage writes (clip_embed over the captions)
    computes again the rows that stage computed again; a file whose bytes changed since
    its row was made is an error row at once and its input is read again by the next
    run. Each time, the table equals a fresh run of the same config over the same files."""
    media = tmp_path / "media"
    shutil.copytree(ROOT / "examples" / "media" / "photos", media)
    models = ROOT / "examples" / "models"
    raw = {"name": "lineage", "store": {"uri": str(tmp_path / "store")},
           "run": {"executor": "local"},
           "stages": [{"type": "ingest_images", "paths": [str(media)]},
                      {"type": "image_quality", "min_blur": 300},
                      {**CAPTION, "model": str(models / "tiny-llava")},
                      {"type": "clip_embed", "model": str(models / "tiny-clip"),
                       "text_column": "caption"}]}

    def fresh(label):
        other = copy.deepcopy(raw)
        other["store"]["uri"] = str(tmp_path / label)
        run(other)
        return table_of(tmp_path / label)

    run(raw)
    before = table_of(tmp_path / "store")
    stage_of(raw, "image_quality")["min_blur"] = 10
    run(raw)
    after = table_of(tmp_path / "store")
    back = alive_for_caption(after, ("error", "quality_reason")) & \
        ~alive_for_caption(before, ("error", "quality_reason"))
    assert back.sum(), "no row came back: the test proves nothing"
    done = computed(tmp_path / "store")
    assert done["caption"] == done["clip_embed"] == back.sum()
    assert_same_table(after, fresh("fresh1"), raw)

    alive = after.filter(pc.is_null(after["quality_reason"]))
    victim = alive["uri"][0].as_py()
    with Image.open(victim) as img:
        img.rotate(90, expand=True).save(victim)
    stage_of(raw, "caption")["prompt"] = "What is this?"
    run(raw)
    rows = {r["uri"]: r for r in table_of(tmp_path / "store").to_pylist()}
    assert rows[victim]["error"].startswith("changed:")
    again = run(raw)
    assert again.rows_processed == 1
    assert_same_table(table_of(tmp_path / "store"), fresh("fresh2"), raw)
