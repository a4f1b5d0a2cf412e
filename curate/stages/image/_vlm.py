"""What caption and vlm_score share: a vision-language model's params, prompts with {column}
placeholders, engines and pools, and the hand-over of images."""

from __future__ import annotations

import string
from functools import cached_property
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from curate.models.vlm import GENERATION_FAILED
from curate.stage import ObjectStoreParams, Resources
from curate.stages._model import HubModelStage


class VllmOptions(BaseModel):
    """vLLM engine settings (engine: vllm)."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_model_len: int = Field(4096, ge=64)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    limit_mm_per_prompt: dict[str, int] = Field(
        default_factory=lambda: {"image": 1}, description="default: one image, or the most "
        "frames split_clips hands with a clip")


def _placeholders(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        return [name for _, name, _, _ in string.Formatter().parse(text) if name]
    except ValueError as exc:
        raise ValueError(f"bad placeholder in {text!r}: {exc}") from None


class VlmParams(ObjectStoreParams):
    model: str = Field(description="hub id, local directory or folder in object storage "
                       "(s3://...) of the VLM")
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


class _VlmStage(HubModelStage):
    """What caption and vlm_score share: prompts, engine, pools, image hand-over."""

    backend_param = "engine"
    skips_dropped = True
    takes_clips = True  # a clip's frames go into one prompt, several images
    #: The column of each row's answer, and of why there is none (a failed generation).
    output_column: str
    failure_column: str
    #: Images in one prompt at most: 1 for images; a clip's frames, as split_clips sets
    #: (`SplitClips.plan`); None when they are not bounded.
    frames_per_prompt: int | None = 1

    def extras(self):
        return ("models",) + (("vllm",) if self.params.engine == "vllm" else ())

    def unfinished(self, rows):
        # the engine failed on them (not the model's answer): the next run asks again
        return pc.fill_null(pc.starts_with(rows[self.failure_column], GENERATION_FAILED),
                            False)

    def config_problems(self):
        p = self.params
        if p.engine != "vllm":
            return []
        problems = []
        tp, gpus = p.vllm.tensor_parallel_size, self.resources.gpus
        if tp > 1 and gpus < tp:
            problems.append(("vllm.tensor_parallel_size", f"{tp} splits the model over {tp} "
                             f"GPUs, but each worker reserves {gpus:g} (resources.gpus); "
                             f"set resources.gpus: {tp}"))
        frames = self.frames_per_prompt
        if frames is None:
            problems.append(("vllm.limit_mm_per_prompt", "split_clips hands sample_fps "
                             "frames per second of clips of any length (max_clip_s unset): "
                             "the images per prompt have no bound; set max_clip_s"))
        elif p.vllm.limit_mm_per_prompt.get("image", 1) < frames and \
                "limit_mm_per_prompt" in p.vllm.model_fields_set:
            problems.append(("vllm.limit_mm_per_prompt", f"image: "
                             f"{p.vllm.limit_mm_per_prompt.get('image', 1)} is fewer than "
                             f"the {frames} frames split_clips hands with each clip; leave "
                             "it unset (it follows the clips) or raise it"))
        return problems

    def prompt_suffix(self) -> str:
        """What the stage adds to every prompt after the user's (a scorer's answer
        instructions)."""
        return ""

    def preflight(self):
        problems = super().preflight()
        p = self.params
        if problems or p.engine != "vllm" or not self.frames_per_prompt:
            return problems
        from curate.models.vlm import prompt_tokens

        conversation = self.conversations(pa.table({c: [""] for c in self.reads()}) if
                                          self.reads() else pa.table({"_": [0]}), [0],
                                          self.prompt_suffix())[0]
        conversation[-1]["content"][:1] = [{"type": "image"}] * self.frames_per_prompt
        try:
            tokens = prompt_tokens(self.checkpoint(weights=False), self.load_revision(),
                                   conversation, self.frames_per_prompt, p.max_image_pixels)
        except Exception as exc:  # a processor that cannot be read: the engine says why
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            return [("model", f"cannot read the processor of {p.model!r}: {first}"[:300])]
        needed = tokens + p.max_new_tokens
        if needed > p.vllm.max_model_len:
            pictures = f"{self.frames_per_prompt} image" + (
                "s" if self.frames_per_prompt > 1 else "")
            return [("vllm.max_model_len", f"{p.vllm.max_model_len} tokens, but a prompt of "
                     f"{pictures} of {p.max_image_pixels:,} pixels is {tokens} tokens, and "
                     f"{p.max_new_tokens} more are generated; raise max_model_len to at "
                     f"least {needed}, or lower max_image_pixels or the frames per clip")]
        return []

    @property
    def pool_key(self):
        return self.spec

    @cached_property
    def spec(self):
        from curate.models.vlm import EngineSpec

        p = self.params
        settings = p.vllm.model_dump() if p.engine == "vllm" else {}
        if settings and "limit_mm_per_prompt" not in p.vllm.model_fields_set:
            settings["limit_mm_per_prompt"] = {"image": self.frames_per_prompt or 1}
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
        import dataclasses

        from curate.models.vlm import get_engine

        self.engine = get_engine(dataclasses.replace(self.spec, model=self.checkpoint(),
                                                     revision=self.load_revision()))

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
                    errors.append(f"{GENERATION_FAILED}: {type(exc).__name__}: {exc}"[:500])
            return texts, errors
