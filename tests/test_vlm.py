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


def clip_pipeline(tmp_path, split: dict, caption: dict) -> dict:
    return {"name": "clips", "store": {"uri": str(tmp_path / "store")},
            "run": {"executor": "local"},
            "stages": [{"type": "ingest_videos", "paths": [str(tmp_path)]},
                       {"type": "split_clips", **split},
                       {"type": "caption", "model": llava(), "engine": "vllm", **caption}]}


def test_vllm_takes_as_many_images_per_prompt_as_a_clip_has_frames(tmp_path):
    """limit_mm_per_prompt follows split_clips (vLLM refused every clip of 3 frames when
    it was left at one image); a limit set below the frames, frames with no bound, and
    tensor parallelism wider than the GPUs a worker holds are config errors."""
    from curate.plan import build_stages

    def caption_of(split: dict, caption: dict | None = None):
        config = load_config(clip_pipeline(tmp_path, split, caption or {}))
        return build_stages(config)[2]

    assert caption_of({}).spec.settings()["limit_mm_per_prompt"] == {"image": 3}
    assert caption_of({"frames_per_clip": 8}).spec.settings()["limit_mm_per_prompt"] == {
        "image": 8}
    assert caption_of({"sample_fps": 2, "max_clip_s": 5.5}).frames_per_prompt == 11
    assert Caption(model=llava(), engine="vllm").spec.settings()[
        "limit_mm_per_prompt"] == {"image": 1}  # images: one each
    # a limit the user sets is kept, and checked
    assert caption_of({}, {"vllm": {"limit_mm_per_prompt": {"image": 5}}}).spec.settings()[
        "limit_mm_per_prompt"] == {"image": 5}

    def problem(split: dict, caption: dict) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(clip_pipeline(tmp_path, split, caption))
        return str(info.value)

    assert ("stages.2.vllm.limit_mm_per_prompt: image: 1 is fewer than the 3 frames "
            "split_clips hands with each clip") in problem(
        {}, {"vllm": {"limit_mm_per_prompt": {"image": 1}}})
    assert "stages.2.vllm.limit_mm_per_prompt: split_clips hands sample_fps" in problem(
        {"sample_fps": 1, "max_clip_s": None}, {})
    assert ("stages.2.vllm.tensor_parallel_size: 4 splits the model over 4 GPUs, but each "
            "worker reserves 1 (resources.gpus); set resources.gpus: 4") in problem(
        {}, {"vllm": {"tensor_parallel_size": 4}, "resources": {"gpus": 1}})


def test_vllm_prompts_longer_than_max_model_len_are_refused_before_any_work(tmp_path):
    """The prompt's tokens (the clip's frames as the processor turns them into visual
    tokens) and the tokens to generate must fit max_model_len; checked with the
    checkpoint's own processor before the engine starts (no vLLM needed to refuse)."""
    import transformers
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(llava())
    chat = [{"role": "user", "content": [{"type": "image"}] * 3 + [
        {"type": "text", "text": Caption.Params(type="caption", model="m/m").prompt}]}]
    text = processor.apply_chat_template([chat], add_generation_prompt=True, tokenize=False)
    tokens = processor(images=[Image.new("RGB", (64, 64))] * 3, text=text,
                       return_tensors="np")["input_ids"].shape[-1]
    caption = {"max_image_pixels": 64 * 64, "max_new_tokens": 8}
    config = load_config(clip_pipeline(tmp_path, {}, {
        **caption, "vllm": {"max_model_len": tokens + 7}}))
    with pytest.raises(ConfigError, match=(
            rf"stages\.2\.vllm\.max_model_len: {tokens + 7} tokens, but a prompt of 3 images "
            rf"of 4,096 pixels is {tokens} tokens, and 8 more are generated; raise "
            rf"max_model_len to at least {tokens + 8}")):
        Pipeline.from_config(config).run(progress=False)
    from curate.plan import build_stages

    fits = build_stages(load_config(clip_pipeline(tmp_path, {}, {
        **caption, "vllm": {"max_model_len": tokens + 8}})))[2]
    assert fits.preflight() == []


def test_a_run_whose_engine_fails_every_row_the_same_way_fails(tmp_path, photo_dir):
    """A caption model whose prompts the engine refuses, every one: the run stops and
    says so (it reported success with every caption missing); run again, it says so
    again. One row failing, or answers that do not parse, are the rows' own."""
    import shutil

    from curate.errors import RunError

    broken = tmp_path / "tiny-llava"
    shutil.copytree(llava(), broken)
    (broken / "chat_template.jinja").write_text(
        "{{ raise_exception('this template takes no images') }}")
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(photo_dir.iterdir())[:3]:
        shutil.copy(path, photos)
    config = load_config({
        "name": "broken", "store": {"uri": str(tmp_path / "store")},
        "run": {"executor": "local"},
        "stages": [{"type": "ingest_images", "paths": [str(photos)]},
                   {"type": "caption", "model": str(broken), "max_new_tokens": 4}]})
    for _ in range(2):
        with pytest.raises(RunError, match=r"caption: every one of its 3 rows failed the "
                                           r"same way \(caption_error\): generation_failed: "
                                           r".*this template takes no images"):
            Pipeline.from_config(config).run(progress=False)
    runs = lancedb.connect(str(tmp_path / "store")).open_table("samples_runs").to_arrow()
    assert runs["status"].to_pylist() == ["failed", "failed"]
