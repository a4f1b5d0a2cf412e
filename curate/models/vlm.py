"""Vision-language models behind one interface: `VlmEngine.generate(images, conversations)`.

Engines: transformers (`AutoModelForImageTextToText`: LLaVA, Qwen2-VL/2.5-VL, SmolVLM,
Idefics3, ...; CPU and GPU) and vLLM (offline engine, GPU; extra `curate[vllm]`). Engines
are cached per worker process, so two stages naming the same model share one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from curate.models import ModelError, require, torch_device


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 means greedy (reproducible)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    min_new_tokens: int = 0


@dataclass(frozen=True)
class EngineSpec:
    """What identifies a loaded engine; equal specs share one engine in a worker."""

    engine: str
    model: str
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    @staticmethod
    def freeze(settings: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        """Engine settings in hashable form (mappings become sorted pairs)."""
        return tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                            for k, v in settings.items()))

    def settings(self) -> dict[str, Any]:
        """The engine settings back as keyword arguments."""
        return {k: dict(v) if isinstance(v, tuple) else v for k, v in self.options}


class VlmEngine:
    """generate(images, conversations, sampling, json_schema) -> one text per row.

    A conversation is chat messages in the Hugging Face format, each picture given as
    `{"type": "image"}` in the user turn; each engine applies the model's own template.
    A row's images are one image, or a list (a clip's frames: one image part each).
    """

    def generate(self, images: list, conversations: list[list[dict]],
                 sampling: Sampling, json_schema: dict | None = None) -> list[str]:
        raise NotImplementedError


class TransformersVlm(VlmEngine):
    """Batched `generate` with the checkpoint's processor and chat template."""

    guided = False  # no constrained decoding: answers are parsed and retried instead

    def __init__(self, spec: EngineSpec):
        transformers = require("transformers", "models")
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        self.torch = require("torch", "models")
        self.device, self.dtype = torch_device(spec.device, spec.dtype)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(
                spec.model, revision=spec.revision)
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(
                spec.model, revision=spec.revision, dtype=self.dtype).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load VLM {spec.model!r}: {exc}") from None
        # Batched generation appends to the right end of every row: pad on the left.
        self.processor.tokenizer.padding_side = "left"

    def generate(self, images, conversations, sampling, json_schema=None):
        torch = self.torch
        prompts = self.processor.apply_chat_template(conversations, add_generation_prompt=True,
                                                     tokenize=False)
        # a row's pictures (one image, or a clip's frames) fill its image parts in order
        flat = [p for row in images for p in (row if isinstance(row, list) else [row])]
        inputs = self.processor(images=flat, text=prompts, return_tensors="pt",
                                padding=True).to(self.device)
        inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        options: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens,
                                   "min_new_tokens": sampling.min_new_tokens or None}
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
            options.update(do_sample=True, temperature=sampling.temperature,
                           top_p=sampling.top_p)
        else:
            options.update(do_sample=False)
        pad = self.processor.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.model.generate(**inputs, **options, pad_token_id=pad)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


class VllmVlm(VlmEngine):
    """vLLM's offline engine with multimodal chat inputs and JSON-schema guided decoding."""

    guided = True

    def __init__(self, spec: EngineSpec):
        vllm = require("vllm", "vllm")
        try:
            self.llm = vllm.LLM(model=spec.model, revision=spec.revision, dtype=spec.dtype,
                                **spec.settings())
        except Exception as exc:  # vLLM raises many kinds at start-up
            raise ModelError(f"vLLM cannot start {spec.model!r}: {exc}") from None
        self.vllm = vllm

    def _sampling(self, sampling: Sampling, json_schema: dict | None):
        from vllm import SamplingParams

        extra: dict[str, Any] = {}
        if json_schema is not None:
            try:  # vLLM >= 0.11
                from vllm.sampling_params import StructuredOutputsParams

                extra["structured_outputs"] = StructuredOutputsParams(json=json_schema)
            except ImportError:
                from vllm.sampling_params import GuidedDecodingParams

                extra["guided_decoding"] = GuidedDecodingParams(json=json_schema)
        return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                              max_tokens=sampling.max_new_tokens,
                              min_tokens=sampling.min_new_tokens, seed=sampling.seed, **extra)

    def generate(self, images, conversations, sampling, json_schema=None):
        messages = []
        for image, conversation in zip(images, conversations):
            pictures = iter(image if isinstance(image, list) else [image])
            turns = []
            for turn in conversation:
                content = turn["content"]
                if isinstance(content, list):  # a text-only model gets no image part
                    content = [{"type": "image_pil", "image_pil": next(pictures)}
                               if part.get("type") == "image" else part for part in content
                               if part.get("type") != "image" or image is not None]
                turns.append({**turn, "content": content})
            messages.append(turns)
        outputs = self.llm.chat(messages, self._sampling(sampling, json_schema), use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]


ENGINES: dict[str, type[VlmEngine]] = {"transformers": TransformersVlm, "vllm": VllmVlm}

#: Engines loaded in this process, by spec: stages naming the same model share one.
_LOADED: dict[EngineSpec, VlmEngine] = {}


#: How a row's error starts when the engine itself failed on it (not the answer).
GENERATION_FAILED = "generation_failed"


def prompt_tokens(model: str, revision: str | None, conversation: list[dict],
                  pictures: int, max_pixels: int) -> int:
    """Tokens of one prompt as the checkpoint's processor makes it: `conversation` with
    `pictures` images of `max_pixels` pixels (the largest a stage hands over), visual
    tokens included. No weights are loaded."""
    transformers = require("transformers", "models")
    processor = transformers.AutoProcessor.from_pretrained(model, revision=revision)
    side = int(max_pixels ** 0.5)
    text = processor.apply_chat_template([conversation], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(images=[Image.new("RGB", (side, side))] * pictures, text=text,
                       return_tensors="np")
    return int(inputs["input_ids"].shape[-1])


def get_engine(spec: EngineSpec) -> VlmEngine:
    if spec not in _LOADED:
        try:
            cls = ENGINES[spec.engine]
        except KeyError:
            raise ModelError(f"unknown VLM engine {spec.engine!r}; known: "
                             f"{', '.join(ENGINES)}") from None
        _LOADED[spec] = cls(spec)
    return _LOADED[spec]


# --- images between pools ---------------------------------------------------------------


def shrink(image: Image.Image, max_pixels: int) -> Image.Image:
    """The image scaled down (aspect kept) to at most `max_pixels` pixels."""
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return image
    scale = (max_pixels / pixels) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def pack_image(image: Image.Image) -> bytes:
    """RGB pixels with their size in front: cheap to make and to read back."""
    header = np.array([image.width, image.height], np.uint32).tobytes()
    return header + np.asarray(image.convert("RGB"), np.uint8).tobytes()


def unpack_image(data: bytes) -> Image.Image:
    width, height = np.frombuffer(data[:8], np.uint32)
    pixels = np.frombuffer(data[8:], np.uint8).reshape(int(height), int(width), 3)
    return Image.fromarray(pixels)


# --- structured answers -----------------------------------------------------------------


def json_schema(criteria: dict[str, dict]) -> dict:
    """JSON schema of an answer: one property per criterion, all required."""
    properties = {}
    for name, c in criteria.items():
        prop: dict[str, Any] = {"type": c["type"]}
        if c.get("min") is not None:
            prop["minimum"] = c["min"]
        if c.get("max") is not None:
            prop["maximum"] = c["max"]
        if c.get("choices"):
            prop["enum"] = list(c["choices"])
        if c.get("description"):
            prop["description"] = c["description"]
        properties[name] = prop
    return {"type": "object", "properties": properties, "required": list(criteria),
            "additionalProperties": False}


def answer_instructions(criteria: dict[str, dict]) -> str:
    """What the model is told about the answer's shape."""
    lines = ["Answer with only a JSON object with these keys:"]
    example = {}
    for name, c in criteria.items():
        kind = c["type"]
        if kind == "boolean":
            what, example[name] = "true or false", False
        elif c.get("choices"):
            what, example[name] = "one of " + ", ".join(map(str, c["choices"])), c["choices"][0]
        else:
            low, high = c.get("min"), c.get("max")
            what = f"{kind}" + (f" from {low} to {high}" if low is not None and high is not None
                                else "")
            example[name] = low if low is not None else 0
        lines.append(f'- "{name}": {what}' + (f" ({c['description']})"
                                                if c.get("description") else ""))
    lines.append("For example: " + json.dumps(example))
    return "\n".join(lines)


class AnswerError(ValueError):
    """An answer that does not fit the criteria; the message is the reason."""


def _json_object(text: str) -> dict:
    start = text.find("{")
    if start < 0:
        raise AnswerError("no JSON object in the answer")
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            escaped = ch == "\\" and not escaped
            if ch == '"' and not escaped:
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                try:
                    value = json.loads(text[start:i + 1])
                except json.JSONDecodeError as exc:
                    raise AnswerError(f"invalid JSON: {exc.msg}") from None
                return value
    raise AnswerError("unterminated JSON object")


def _coerce(name: str, value: Any, c: dict) -> Any:
    kind = c["type"]
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("yes", "true", "no", "false"):
            return value.strip().lower() in ("yes", "true")
        raise AnswerError(f"{name}: expected true or false, got {value!r}")
    if kind in ("integer", "number"):
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise AnswerError(f"{name}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise AnswerError(f"{name}: expected a number, got {value!r}")
        if kind == "integer":
            if float(value) != int(value):
                raise AnswerError(f"{name}: expected a whole number, got {value!r}")
            value = int(value)
        if c.get("min") is not None and value < c["min"]:
            raise AnswerError(f"{name}: {value} is below {c['min']}")
        if c.get("max") is not None and value > c["max"]:
            raise AnswerError(f"{name}: {value} is above {c['max']}")
        return value
    if not isinstance(value, str):
        raise AnswerError(f"{name}: expected text, got {value!r}")
    if c.get("choices") and value not in c["choices"]:
        raise AnswerError(f"{name}: {value!r} is not one of {list(c['choices'])}")
    return value


def parse_answer(text: str, criteria: dict[str, dict]) -> dict[str, Any]:
    """The criteria's values from a model's answer; AnswerError says what is wrong."""
    value = _json_object(text)
    if not isinstance(value, dict):
        raise AnswerError("the answer is not a JSON object")
    missing = [name for name in criteria if name not in value]
    if missing:
        raise AnswerError("missing " + ", ".join(missing))
    return {name: _coerce(name, value[name], c) for name, c in criteria.items()}
