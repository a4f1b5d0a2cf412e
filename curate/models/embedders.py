"""CLIP-style image/text embedders behind one interface.

Work is split in two so the engine can keep GPUs fed: `prepare` (CPU, in the decode pool)
resizes and crops images to the model's input size as uint8; `embed_pixels` (on the model
pool, GPU when there is one) normalises, runs the image tower and L2-normalises.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from curate.models import ModelError, require, torch_device


class ImageTextEmbedder:
    """The interface stages use. `load_weights=False` loads only the preprocessing."""

    backend: str

    def __init__(self, model: str, revision: str | None = None, *, device: str = "auto",
                 dtype: str = "auto", load_weights: bool = True, **options: Any):
        self.model_id = model
        self.revision = revision

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what `prepare` returns per image."""
        raise NotImplementedError

    def prepare(self, images: list[Image.Image]) -> np.ndarray:
        """uint8 array (n, 3, H, W): images resized and cropped as the model expects."""
        raise NotImplementedError

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (n, d) L2-normalised image embeddings of `prepare`'s output."""
        raise NotImplementedError

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """float32 (n, d) L2-normalised text embeddings."""
        raise NotImplementedError


def _normalised(features) -> np.ndarray:
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return features.cpu().numpy().astype(np.float32)


def _pooled(output):
    """transformers 5 returns model outputs from get_*_features; older versions tensors."""
    return getattr(output, "pooler_output", output)


class TransformersEmbedder(ImageTextEmbedder):
    """CLIPModel, SiglipModel and friends by hub id or local path (AutoModel)."""

    backend = "transformers"

    def __init__(self, model: str, revision: str | None = None, *, device: str = "auto",
                 dtype: str = "auto", load_weights: bool = True, **options: Any):
        super().__init__(model, revision)
        transformers = require("transformers", "models")
        # Without torchvision, transformers falls back to its PIL processors and says so
        # on every load; that is the intended set-up here, not something to act on.
        logging.getLogger("transformers").setLevel(logging.ERROR)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            # PIL's image processors, whether or not torchvision is installed: the fast
            # ones resize differently, and every node must prepare images alike
            processor = transformers.AutoProcessor.from_pretrained(model, revision=revision,
                                                                   backend="pil")
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the processor of {model!r}: {exc}") from None
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        size = self.image_processor.crop_size if getattr(
            self.image_processor, "do_center_crop", False) else self.image_processor.size
        side = size.get("height") or size.get("shortest_edge")
        self._shape = (3, int(side), int(side))
        self.model = None
        if load_weights:
            self.device, self.dtype = torch_device(device, dtype)
            try:
                self.model = transformers.AutoModel.from_pretrained(
                    model, revision=revision, dtype=self.dtype
                ).to(self.device).eval()
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot load model {model!r}: {exc}") from None
            torch = require("torch", "models")
            scale = float(getattr(self.image_processor, "rescale_factor", 1 / 255))
            mean = torch.tensor(self.image_processor.image_mean).view(1, 3, 1, 1) / scale
            std = torch.tensor(self.image_processor.image_std).view(1, 3, 1, 1) / scale
            self._mean, self._std = mean.to(self.device), std.to(self.device)
            config = self.model.config
            text = getattr(config, "text_config", None)
            self._max_text = int(getattr(text, "max_position_embeddings", 77))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._shape

    def prepare(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, *self._shape), np.uint8)
        out = self.image_processor(images=images, do_rescale=False, do_normalize=False,
                                   return_tensors="np")["pixel_values"]
        if out.dtype == np.uint8:  # the PIL processors keep the resized bytes
            return out
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        torch = require("torch", "models")
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device, non_blocking=True).float()
            x = ((x - self._mean) / self._std).to(self.dtype)
            return _normalised(_pooled(self.model.get_image_features(pixel_values=x)))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        torch = require("torch", "models")
        # Always the full length: SigLIP was trained so, and for CLIP it keeps one shape
        # per batch (see in_fixed_batches); the causal mask makes the padding inert.
        tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                max_length=self._max_text, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()
                  if k in ("input_ids", "attention_mask")}
        if "siglip" in self.model.config.model_type:
            tokens.pop("attention_mask", None)  # SigLIP attends to the padding it saw
        with torch.inference_mode():
            return _normalised(_pooled(self.model.get_text_features(**tokens)))


class OpenClipEmbedder(ImageTextEmbedder):
    """open_clip models (LAION checkpoints); optional extra `curate[openclip]`.

    `model` is an open_clip architecture name (e.g. ViT-L-14) and `pretrained` its weights
    tag or a local checkpoint path; `hf-hub:org/name` ids work as open_clip resolves them.
    """

    backend = "open_clip"

    def __init__(self, model: str, revision: str | None = None, *, device: str = "auto",
                 dtype: str = "auto", load_weights: bool = True, pretrained: str | None = None,
                 **options: Any):
        super().__init__(model, revision)
        open_clip = require("open_clip", "openclip")
        torch = require("torch", "models")
        self.device, self.dtype = torch_device(device, dtype)
        net = None
        try:
            if load_weights or model.startswith(("hf-hub:", "local-dir:")):
                net, _, preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=pretrained, device=self.device if load_weights else "cpu")
                size = net.visual.image_size
            else:
                size, preprocess = _open_clip_transform(open_clip, model, pretrained)
        except Exception as exc:  # torch.load alone raises several kinds on a bad file
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"cannot load open_clip model {model!r} "
                             f"(pretrained={pretrained!r}): {first}") from None
        # The torchvision transform: keep the geometric steps (resize, crop) for `prepare`
        # and take mean/std from its Normalize step for the model side.
        # (open_clip 3 names its step MaybeToTensor: it passes tensors through)
        steps = list(preprocess.transforms)
        cut = next((i for i, t in enumerate(steps) if type(t).__name__.endswith("ToTensor")),
                   len(steps))
        self._geometry = [t for t in steps[:cut] if callable(t)]
        norm = next(t for t in steps if type(t).__name__ == "Normalize")
        side = size[0] if isinstance(size, tuple | list) else size
        self._shape = (3, int(side), int(side))
        self._mean = torch.tensor(norm.mean).view(1, 3, 1, 1).to(self.device) * 255
        self._std = torch.tensor(norm.std).view(1, 3, 1, 1).to(self.device) * 255
        # (the model side only: some tokenizers are fetched from the hub)
        self.tokenizer = open_clip.get_tokenizer(model) if load_weights else None
        self.model = net.to(self.device, self.dtype).eval() if load_weights else None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._shape

    def prepare(self, images: list[Image.Image]) -> np.ndarray:
        out = np.zeros((len(images), *self._shape), np.uint8)
        for i, image in enumerate(images):
            for step in self._geometry:
                image = step(image)
            out[i] = np.asarray(image.convert("RGB"), np.uint8).transpose(2, 0, 1)
        return out

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        torch = require("torch", "models")
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device).float()
            x = ((x - self._mean) / self._std).to(self.dtype)
            return _normalised(self.model.encode_image(x))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        torch = require("torch", "models")
        with torch.inference_mode():
            return _normalised(self.model.encode_text(self.tokenizer(texts).to(self.device)))


def _open_clip_transform(open_clip, model: str, pretrained: str | None):
    """(image size, eval transform) of a built-in open_clip architecture as
    `create_model_and_transforms` makes them, without building the model or fetching its
    weights (decode workers only resize and crop): the size from the architecture's
    config, mean, std, interpolation and resize mode from the weights tag's config (a
    checkpoint file has none, so open_clip's defaults). Checkpoints named `hf-hub:` or
    `local-dir:` keep their preprocessing beside the weights and are loaded whole."""
    import os

    model = model.replace("/", "-")  # as open_clip's create_model reads the name
    config = open_clip.get_model_config(model)
    if config is None:
        raise ValueError(f"open_clip knows no model {model!r}")
    tag = {}
    if pretrained and "://" not in pretrained and not os.path.isfile(pretrained):
        tag = open_clip.get_pretrained_cfg(model, pretrained)
        if not tag:
            raise ValueError(f"{pretrained!r} is neither a weights tag of {model} nor a file")
    size = config["vision_cfg"]["image_size"]
    return size, open_clip.image_transform(
        size, is_train=False, mean=tag.get("mean"), std=tag.get("std"),
        resize_mode=tag.get("resize_mode"), interpolation=tag.get("interpolation"))


BACKENDS: dict[str, type[ImageTextEmbedder]] = {
    "transformers": TransformersEmbedder,
    "open_clip": OpenClipEmbedder,
}


def load_embedder(backend: str, model: str, **kwargs: Any) -> ImageTextEmbedder:
    try:
        cls = BACKENDS[backend]
    except KeyError:
        raise ModelError(f"unknown embedder backend {backend!r}; "
                         f"known: {', '.join(BACKENDS)}") from None
    return cls(model, **kwargs)
