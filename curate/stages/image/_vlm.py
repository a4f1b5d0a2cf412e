"""caption and vlm_score: a vision-language model writes captions, or rates images on
criteria named in the config and answers in JSON."""

from __future__ import annotations

import string
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curate.registry import register
from curate.stage import Resources, StageParams
from curate.stages.model_stage import ModelStage


class VllmOptions(BaseModel):
    """vLLM engine settings (engine: vllm)."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_model_len: int = Field(4096, ge=64)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 1})


def _placeholders(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        return [name for _, name, _, _ in string.Formatter().parse(text) if name]
    except ValueError as exc:
        raise ValueError(f"bad placeholder in {text!r}: {exc}") from None


class VlmParams(StageParams):
    model: str = Field(description="hub id or local directory of the VLM")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers (CPU and GPU) or vllm (GPU; extra [vllm])")
    revision: str | None = Field(None, description="hub revision")
    system: str | None = Field(None, description="system prompt; {column} placeholders are "
                               "filled from the row")
    max_new_tokens: int = Field(128, ge=1, le=8192, description="tokens to generate at most")
    min_new_tokens: int = Field(0, ge=0, description="tokens to generate at least")
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy (reproducible)")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, description="sampling seed")
    max_image_pixels: int = Field(1024 * 1024, ge=64 * 64, description="images are scaled "
                                  "down to at most this many pixels before the model")
    device: str = Field("auto", description="transformers: auto, cpu, cuda, cuda:1")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto")
    vllm: VllmOptions = Field(default_factory=VllmOptions, description="vLLM settings")
    resources: Resources = Field(default_factory=lambda: Resources(batch_size=16))

    @field_validator("system", "prompt", check_fields=False)
    @classmethod
    def _check_placeholders(cls, value):
        _placeholders(value)
        return value


class _VlmStage(ModelStage):
    """What caption and vlm_score share: prompts, engine, pools, image hand-over."""

    backend_param = "engine"
    skips_dropped = True
    takes_clips = True  # a clip's frames go into one prompt, several images

    @property
    def own_pool(self) -> bool:
        return True

    @property
    def pool_key(self):
        return self.spec

    @cached_property
    def spec(self):
        from curate.models.vlm import EngineSpec

        p = self.params
        settings = p.vllm.model_dump() if p.engine == "vllm" else {}
        return EngineSpec(p.engine, p.model, p.revision, p.device, p.dtype,
                          EngineSpec.freeze(settings))

    @property
    def prepared_column(self) -> str:
        # Stages sharing a model share the scaled images too: prepared once, sent once.
        return f"{self.PREPARED_PREFIX}vlm:{self.params.max_image_pixels}"

    def reads(self):
        return tuple(dict.fromkeys(_placeholders(self.params.system)
                                   + _placeholders(self.params.prompt)))

    def prepare(self, batch, images):
        """Each row's pictures, scaled down: an image's one, or a clip's sampled frames."""
        from curate.models.vlm import pack_image, shrink

        limit = self.params.max_image_pixels
        packed = []
        for item in images:
            pictures = [] if item is None else getattr(item, "frames", [item])
            packed.append([pack_image(shrink(p, limit)) for p in pictures] or None)
        return pa.array(packed, pa.list_(pa.binary()))

    def setup(self):
        from curate.models.vlm import get_engine

        self.engine = get_engine(self.spec)

    def sampling(self):
        from curate.models.vlm import Sampling

        p = self.params
        return Sampling(p.temperature, p.top_p, p.max_new_tokens, p.seed, p.min_new_tokens)

    def conversations(self, batch: pa.Table, rows: list[int], suffix: str = ""
                      ) -> list[list[dict]]:
        """The chat of each row: one image part per picture (a clip's frames), its
        placeholders filled, then `suffix` (kept verbatim)."""
        counts = None
        prepared = batch.schema.field(self.prepared_column).type \
            if self.prepared_column in batch.column_names else None
        if prepared is not None and pa.types.is_list(prepared):  # a clip's frames
            lengths = pc.list_value_length(batch[self.prepared_column].combine_chunks())
            counts = [max(n or 1, 1) for n in lengths.to_pylist()]
        fields = self.reads()
        values = {name: batch[name].to_pylist() for name in fields}
        out = []
        for i in rows:
            row = {name: "" if values[name][i] is None else values[name][i] for name in fields}
            turns = []
            if self.params.system:
                turns.append({"role": "system", "content": self.params.system.format(**row)})
            pictures = counts[i] if counts is not None else 1
            turns.append({"role": "user", "content": [
                *[{"type": "image"}] * pictures,
                {"type": "text", "text": self.params.prompt.format(**row) + suffix}]})
            out.append(turns)
        return out

    def images(self, batch: pa.Table) -> tuple[list[int], list]:
        from curate.models.vlm import unpack_image

        packed = batch[self.prepared_column].to_pylist()  # all None where typed null
        rows = [i for i, data in enumerate(packed) if data]
        return rows, [[unpack_image(p) for p in packed[i]] for i in rows]

    def generate(self, images, conversations, json_schema=None) -> tuple[list, list]:
        """(texts, errors): a batch that fails is retried row by row, so one bad input
        never costs the others their output."""
        sampling = self.sampling()
        try:
            return self.engine.generate(images, conversations, sampling, json_schema), \
                [None] * len(images)
        except Exception:  # any engine failure: fall back to one row at a time
            texts, errors = [], []
            for image, conversation in zip(images, conversations):
                try:
                    texts.append(self.engine.generate([image], [conversation], sampling,
                                                      json_schema)[0])
                    errors.append(None)
                except Exception as exc:  # this row alone fails: record why
                    texts.append(None)
                    errors.append(f"generation_failed: {type(exc).__name__}: {exc}"[:500])
            return texts, errors


class CaptionParams(VlmParams):
    prompt: str = Field("Describe this image in one detailed sentence.",
                        description="user prompt; {column} placeholders are filled from the "
                        "row, e.g. 'The alt text says: {alt_text}. Write a caption.'")


@register("caption")
class Caption(_VlmStage):
    """A caption per image from a vision-language model, as `caption`."""

    type = "caption"
    Params = CaptionParams

    def writes(self):
        return {"caption": pa.string(), "caption_error": pa.string()}

    def process(self, batch, images):
        rows, pictures = self.images(batch)
        captions: list[str | None] = [None] * batch.num_rows
        errors: list[str | None] = [None] * batch.num_rows
        if rows:
            texts, failures = self.generate(pictures, self.conversations(batch, rows))
            for i, text, error in zip(rows, texts, failures):
                captions[i] = text if error is None else None
                errors[i] = error if error else (None if text else "empty: no caption text")
        return {"caption": pa.array(captions, pa.string()),
                "caption_error": pa.array(errors, pa.string())}


class Criterion(BaseModel):
    """One thing the model rates."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["integer", "number", "boolean", "string"] = "integer"
    min: float | None = None
    max: float | None = None
    choices: list[str] | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _range(self):
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if self.choices and self.type != "string":
            raise ValueError("choices are for type: string")
        return self


_ARROW = {"integer": pa.int32(), "number": pa.float32(), "boolean": pa.bool_(),
          "string": pa.string()}


class VlmScoreParams(VlmParams):
    prompt: str = Field("Rate this image.", description="user prompt; the answer format is "
                        "appended; {column} placeholders are filled from the row")
    criteria: dict[str, Criterion] = Field(description="name -> {type, min, max, choices, "
                                           "description}; the model answers each in JSON")
    score: str | None = Field(None, description="criterion written as vlm_score (default: "
                              "the first integer or number criterion)")
    min_score: float | None = Field(None, description="drop rows whose vlm_score is below")
    max_new_tokens: int = Field(96, ge=1, le=8192, description="tokens to generate at most")

    @field_validator("criteria")
    @classmethod
    def _names(cls, value):
        if not value:
            raise ValueError("name at least one criterion")
        for name in value:
            if not name.isidentifier():
                raise ValueError(f"criterion name {name!r} must be a plain identifier")
        return value

    @model_validator(mode="after")
    def _score(self):
        numeric = [n for n, c in self.criteria.items() if c.type in ("integer", "number")]
        if self.score is None:
            if not numeric:
                raise ValueError("no integer or number criterion to use as vlm_score")
            self.score = numeric[0]
        elif self.score not in numeric:
            raise ValueError(f"score {self.score!r} must name an integer or number "
                             f"criterion ({', '.join(numeric) or 'none'})")
        return self


@register("vlm_score")
class VlmScore(_VlmStage):
    """A vision-language model rates each image on the configured criteria, answering in
    JSON (schema-guided on vLLM; parsed strictly with one retry otherwise). Writes
    `vlm_score` (the main criterion) and `vlm_scores` (all of them); an answer that is
    still invalid leaves them null and says why in `vlm_score_error`."""

    type = "vlm_score"
    Params = VlmScoreParams
    verdict_column = "vlm_score_reason"

    @cached_property
    def _criteria(self) -> dict[str, dict[str, Any]]:
        return {n: c.model_dump() for n, c in self.params.criteria.items()}

    def written_names(self):
        return ("vlm_score", "vlm_scores", "vlm_score_error", "vlm_score_reason")

    def writes(self):
        struct = pa.struct([(n, _ARROW[c.type]) for n, c in self.params.criteria.items()])
        return {"vlm_score": pa.float32(), "vlm_scores": struct,
                "vlm_score_error": pa.string(), "vlm_score_reason": pa.string()}

    def _ask(self, batch, rows, pictures, suffix, schema):
        from curate.models.vlm import AnswerError, parse_answer

        texts, failures = self.generate(pictures, self.conversations(batch, rows, suffix),
                                        schema)
        answers, errors = [], []
        for text, failure in zip(texts, failures):
            try:
                if failure:
                    raise AnswerError(failure)
                answers.append(parse_answer(text, self._criteria))
                errors.append(None)
            except AnswerError as exc:
                answers.append(None)
                errors.append(f"invalid_answer: {exc}; answer was {text!r}"[:500])
        return answers, errors

    def process(self, batch, images):
        from curate.models.vlm import answer_instructions, json_schema

        p = self.params
        schema = json_schema(self._criteria)
        suffix = "\n" + answer_instructions(self._criteria)
        rows, pictures = self.images(batch)
        answers: list[dict | None] = [None] * batch.num_rows
        errors: list[str | None] = [None] * batch.num_rows
        if rows:
            got, why = self._ask(batch, rows, pictures, suffix, schema)
            retry = [k for k, answer in enumerate(got) if answer is None]
            if retry and not getattr(self.engine, "guided", False):
                again, why_again = self._ask(
                    batch, [rows[k] for k in retry], [pictures[k] for k in retry],
                    suffix + "\nReply with the JSON object only, nothing else.", schema)
                for k, answer, error in zip(retry, again, why_again):
                    got[k], why[k] = answer, error
            for i, answer, error in zip(rows, got, why):
                answers[i], errors[i] = answer, error
        main = np.array([np.nan if a is None else float(a[p.score]) for a in answers],
                        np.float32)
        reasons = [None] * batch.num_rows
        if p.min_score is not None:
            reasons = [f"vlm_score {value:g} < {p.min_score:g}"
                       if answer is not None and value < p.min_score else None
                       for answer, value in zip(answers, main)]
        return {"vlm_score": pa.array(main, pa.float32(), mask=np.isnan(main)),
                "vlm_scores": pa.array(answers, self.writes()["vlm_scores"]),
                "vlm_score_error": pa.array(errors, pa.string()),
                "vlm_score_reason": pa.array(reasons, pa.string())}
