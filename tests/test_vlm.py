"""VLM stages: a tiny randomly initialised LLaVA through the real transformers engine
(greedy, so reproducible), answer parsing on real and malformed outputs, engine sharing."""

from __future__ import annotations

import lancedb
import pyarrow as pa
import pytest

from curate import Pipeline, load_config
from curate.errors import ConfigError
from curate.models.vlm import (
    AnswerError,
    EngineSpec,
    Sampling,
    VlmEngine,
    answer_instructions,
    get_engine,
    json_schema,
    pack_image,
    parse_answer,
    shrink,
    unpack_image,
)
from curate.stages import Caption, VlmScore

from .conftest import tiny_models
from .test_models import photos

CRITERIA = {
    "quality": {"type": "integer", "min": 1, "max": 5, "description": "overall quality"},
    "watermark": {"type": "boolean", "description": "a visible watermark"},
    "style": {"type": "string", "choices": ["photo", "drawing"]},
}


def llava() -> str:
    return str(tiny_models() / "tiny-llava")


@pytest.mark.parametrize("text, expected", [
    ('{"quality": 4, "watermark": false, "style": "photo"}',
     {"quality": 4, "watermark": False, "style": "photo"}),
    ('Sure! Here it is:\n```json\n{"quality": "5", "watermark": "yes", "style": "drawing"}\n```',
     {"quality": 5, "watermark": True, "style": "drawing"}),
    ('{"quality": 3.0, "watermark": "No", "style": "photo", "note": "a {brace} inside"}',
     {"quality": 3, "watermark": False, "style": "photo"}),
])
def test_valid_answers_parse(text, expected):
    assert parse_answer(text, CRITERIA) == expected


@pytest.mark.parametrize("text, reason", [
    ("It is a nice photo, 4 out of 5.", "no JSON object"),
    ('{"quality": 4, "watermark": false', "unterminated"),
    ('{"quality": 4, watermark: false}', "invalid JSON"),
    ('{"quality": 4, "style": "photo"}', "missing watermark"),
    ('{"quality": 7, "watermark": false, "style": "photo"}', "quality: 7 is above 5"),
    ('{"quality": 3.5, "watermark": false, "style": "photo"}', "whole number"),
    ('{"quality": "great", "watermark": false, "style": "photo"}', "expected a number"),
    ('{"quality": 2, "watermark": "maybe", "style": "photo"}', "expected true or false"),
    ('{"quality": 2, "watermark": true, "style": "sketch"}', "not one of"),
    ('[1, 2]', "no JSON object"),
])
def test_malformed_answers_say_what_is_wrong(text, reason):
    with pytest.raises(AnswerError, match=reason):
        parse_answer(text, CRITERIA)


def test_schema_and_instructions_name_every_criterion():
    schema = json_schema(CRITERIA)
    assert schema["required"] == ["quality", "watermark", "style"]
    assert schema["properties"]["quality"] == {"type": "integer", "minimum": 1, "maximum": 5,
                                               "description": "overall quality"}
    assert schema["properties"]["style"]["enum"] == ["photo", "drawing"]
    text = answer_instructions(CRITERIA)
    assert '"quality": integer from 1 to 5 (overall quality)' in text
    assert '{"quality": 1, "watermark": false, "style": "photo"}' in text


def test_images_travel_between_pools_exactly():
    image = photos(1)[0]
    small = shrink(image, 200 * 150)
    assert small.width * small.height <= 200 * 150 and small.width / small.height == pytest.approx(
        image.width / image.height, rel=0.02)
    assert unpack_image(pack_image(small)).tobytes() == small.tobytes()


def test_tiny_llava_generates_reproducibly_in_batches():
    engine = get_engine(EngineSpec("transformers", llava(), device="cpu"))
    images = photos(3)
    conversation = [{"role": "system", "content": "You write captions."},
                    {"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": "Describe it."}]}]
    sampling = Sampling(max_new_tokens=8)
    batch = engine.generate(images, [conversation] * 3, sampling)
    assert len(batch) == 3 and all(isinstance(t, str) for t in batch)
    assert engine.generate(images, [conversation] * 3, sampling) == batch  # greedy
    assert engine.generate(images[1:2], [conversation], sampling) == batch[1:2]  # unbatched
    assert get_engine(EngineSpec("transformers", llava(), device="cpu")) is engine  # cached


def _run_stage(stage, images, **columns):
    batch = pa.table({"sample_id": [str(i) for i in range(len(images))], **columns})
    batch = batch.append_column(stage.prepared_column, stage.prepare(batch, images))
    stage.setup()
    return stage.process(batch, None)


def test_caption_stage_fills_prompts_from_the_row():
    stage = Caption(model=llava(), device="cpu", max_new_tokens=6,
                    prompt="The alt text says: {alt_text}. Write a caption.")
    assert stage.reads() == ("alt_text",)
    convo = stage.conversations(pa.table({"alt_text": ["a cat", None]}), [0, 1])
    assert convo[0][0]["content"][1]["text"] == "The alt text says: a cat. Write a caption."
    assert convo[1][0]["content"][1]["text"] == "The alt text says: . Write a caption."
    images = [*photos(2), None]
    out = _run_stage(stage, images, alt_text=["a cat", "coffee", "x"])
    captions, errors = out["caption"].to_pylist(), out["caption_error"].to_pylist()
    assert captions[2] is None and errors[2] is None  # no image: nothing asked
    for caption, error in zip(captions[:2], errors[:2]):
        assert (caption is not None) != (error is not None)


class ScriptedEngine(VlmEngine):
    """Answers from a script, to drive the retry logic with known outputs."""

    guided = False

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    def generate(self, images, conversations, sampling, json_schema=None):
        self.calls.append([c[-1]["content"][1]["text"] for c in conversations])
        if self.answers and isinstance(self.answers[0], Exception):
            raise self.answers.pop(0)
        return [self.answers.pop(0) for _ in images]


def test_vlm_score_parses_retries_once_and_never_crashes():
    stage = VlmScore(model=llava(), device="cpu", criteria=CRITERIA, min_score=3)
    assert stage.params.score == "quality"
    stage.setup()
    images = photos(3)
    packed = stage.prepare(pa.table({"x": [1, 2, 3]}), images)
    batch = pa.table({"sample_id": ["a", "b", "c"], stage.prepared_column: packed})
    stage.engine = ScriptedEngine([
        '{"quality": 4, "watermark": false, "style": "photo"}',   # valid at once
        'I would say 2.',                                         # invalid, then valid
        '{"quality": 9, "watermark": true, "style": "photo"}',    # invalid twice
        '{"quality": 2, "watermark": "yes", "style": "drawing"}',
        'still not JSON',
    ])
    out = stage.process(batch, None)
    assert out["vlm_score"].to_pylist() == [4.0, 2.0, None]
    assert out["vlm_scores"].to_pylist()[:2] == [
        {"quality": 4, "watermark": False, "style": "photo"},
        {"quality": 2, "watermark": True, "style": "drawing"}]
    assert out["vlm_scores"].to_pylist()[2] is None
    assert out["vlm_score_error"].to_pylist()[2].startswith("invalid_answer: no JSON object")
    assert out["vlm_score_reason"].to_pylist() == [None, "vlm_score 2 < 3", None]
    first, retry = stage.engine.calls
    assert len(first) == 3 and len(retry) == 2 and "JSON object only" in retry[0]


def test_a_failing_batch_is_retried_row_by_row():
    stage = Caption(model=llava(), device="cpu")
    stage.setup()
    images = photos(2)
    packed = stage.prepare(pa.table({"x": [1, 2]}), images)
    batch = pa.table({"sample_id": ["a", "b"], stage.prepared_column: packed})
    stage.engine = ScriptedEngine([RuntimeError("CUDA out of memory"), "a cat",
                                   ValueError("bad image"), "unused"])
    out = stage.process(batch, None)
    assert out["caption"].to_pylist() == ["a cat", None]
    assert out["caption_error"].to_pylist()[1].startswith("generation_failed: ValueError")


def test_two_stages_on_one_model_share_one_pool_and_engine():
    from curate.engine.workers import SegmentWorker
    from curate.plan import segments
    from curate.stages.image.ingest_images import IngestImages

    caption = Caption(model=llava(), device="cpu")
    score = VlmScore(model=llava(), device="cpu", criteria=CRITERIA)
    other = Caption(name="caption_b", model=llava(), device="cpu", max_image_pixels=4096)
    source = IngestImages(paths=["x"])
    pools = segments([source, caption, score])
    assert [len(p) for p in pools] == [1, 2]
    assert caption.prepared_column == score.prepared_column  # images sent once
    assert other.prepared_column != caption.prepared_column
    worker = SegmentWorker(pools[1], [], last=True, row_stages_hash="h")
    assert worker.stages[0].engine is worker.stages[1].engine


def test_config_errors_name_the_key():
    base = {"name": "t", "store": {"uri": "/tmp/unused"},
            "stages": [{"type": "ingest_images", "paths": ["x"]}]}

    def problems(stage):
        with pytest.raises(ConfigError) as info:
            load_config({**base, "stages": [*base["stages"], stage]})
        return str(info.value)

    assert "stages.1: caption reads column 'title'" in problems(
        {"type": "caption", "model": "m/m", "prompt": "Title: {title}"})
    assert "stages.1.criteria" in problems(
        {"type": "vlm_score", "model": "m/m", "criteria": {}})
    assert "stages.1.criteria.q: min (5.0) is greater than max (1.0)" in problems(
        {"type": "vlm_score", "model": "m/m", "criteria": {"q": {"min": 5, "max": 1}}})
    assert "score 'w' must name an integer or number criterion" in problems(
        {"type": "vlm_score", "model": "m/m", "score": "w",
         "criteria": {"w": {"type": "boolean"}}})
    assert "stages.1.vllm.max_num_seq" in problems(
        {"type": "caption", "model": "m/m", "vllm": {"max_num_seq": 4}})


def test_caption_and_score_in_a_real_pipeline(ray_session, photo_dir, tmp_path):
    config = load_config({
        "name": "vlm", "store": {"uri": str(tmp_path / "store")},
        "stages": [
            {"type": "ingest_images", "paths": [str(photo_dir)]},
            {"type": "caption", "model": llava(), "max_new_tokens": 6},
            {"type": "vlm_score", "model": llava(), "max_new_tokens": 12,
             "criteria": {"quality": {"min": 1, "max": 5}}},
        ]})
    summary = Pipeline.from_config(config).run(progress=False)
    assert summary.status == "finished" and summary.rows_total == 24
    assert any("tiny-llava" in n and "stand-in" in n for n in summary.notices)
    table = lancedb.connect(str(tmp_path / "store")).open_table("samples").to_arrow()
    assert not any(c.startswith("_prepared") for c in table.column_names)
    for row in table.to_pylist():
        assert (row["caption"] is not None) != (row["caption_error"] is not None)
        # a random model rarely answers in JSON: either a valid score or the reason
        assert (row["vlm_score"] is not None) != (row["vlm_score_error"] is not None)


def test_rows_dropped_earlier_never_reach_the_model(demo_media):
    """Caption after image_quality: the engine sees only rows that are still in."""
    from curate.engine.workers import SegmentWorker
    from curate.stages.image.image_quality import ImageQuality
    from curate.stages.image.ingest_images import IngestImages

    source = IngestImages(paths=[str(demo_media / "low_quality"), str(demo_media / "photos")])
    quality = ImageQuality(min_side=128, min_blur=10)
    caption = Caption(model=llava(), device="cpu")
    earlier = {"caption": ["error", "quality_reason"]}
    decode = SegmentWorker([source, quality], [caption], last=False, row_stages_hash="h",
                           earlier_verdicts=earlier)
    model = SegmentWorker([caption], [], last=True, row_stages_hash="h",
                          earlier_verdicts=earlier)
    engine = model.stages[0].engine = ScriptedEngine(["a caption"] * 100)
    out = model(decode(source.list_inputs()))
    rows = out.to_pylist()
    dropped = [r for r in rows if r["quality_reason"] or r["error"]]
    kept = [r for r in rows if not (r["quality_reason"] or r["error"])]
    assert dropped and kept
    assert all(r["caption"] is None and r["caption_error"] is None for r in dropped)
    assert all(r["caption"] == "a caption" for r in kept)
    assert sum(len(call) for call in engine.calls) == len(kept)
    assert not any(c.startswith("_prepared") for c in out.column_names)
