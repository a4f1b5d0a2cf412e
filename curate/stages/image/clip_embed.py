"""clip_embed: image (and optionally text) embeddings by a CLIP/SigLIP model."""

from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import Field

from curate.algos.vectors import column_pixels, from_matrix, prepared_pixels, vector_type
from curate.media import objstore
from curate.media.decode import MediaError
from curate.models import in_fixed_batches
from curate.stage import ObjectStoreParams, Resources
from curate.stages._model import HubModelStage


class ClipEmbedParams(ObjectStoreParams):
    model: str = Field(description="hub id, local directory or folder in object storage "
                       "(s3://...) of a CLIP/SigLIP checkpoint (transformers), or an open_clip "
                       "architecture name (open_clip)")
    backend: Literal["transformers", "open_clip"] = Field(
        "transformers", description="model library; open_clip needs `pip install "
        "'curate[openclip]'` and a torchvision that matches torch")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    pretrained: str | None = Field(None, description="open_clip weights tag, or checkpoint "
                                   "path or object (s3://...)")
    text_column: str | None = Field(
        None, description="also embed this text column (e.g. alt_text) as clip_text_embedding")
    device: str = Field("auto", description="auto (GPU when there is one), cpu, cuda, cuda:1")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 (or float16) on GPU")
    resources: Resources = Field(default_factory=lambda: Resources(batch_size=64))


def _embedding_dim(params: ClipEmbedParams, model: str, revision: str | None) -> int:
    """The embedding size, read from the config of `model` (the checkpoint's local place,
    or its hub id, at `revision`) without loading weights."""
    if params.backend == "open_clip":
        from curate.models import require

        config = require("open_clip", "openclip").get_model_config(params.model)
        if config is None:
            raise ValueError(f"open_clip knows no model {params.model!r}")
        return int(config["embed_dim"])
    # the config as transformers reads it: hub configs leave out keys at their defaults
    # (a SigLIP's vision hidden_size), which the raw JSON does not have
    from curate.models import require

    config = require("transformers", "models").AutoConfig.from_pretrained(
        model, revision=revision)
    if getattr(config, "projection_dim", None):
        return int(config.projection_dim)
    return int(config.vision_config.hidden_size)  # SigLIP: no projection


class ClipEmbed(HubModelStage):
    """CLIP/SigLIP image embeddings (L2-normalised) as `clip_embedding`, and optionally
    text embeddings of a caption column as `clip_text_embedding`. Images are resized and
    cropped where they are decoded; the model runs on its own pool (GPU-ready)."""

    type = "clip_embed"
    Params = ClipEmbedParams
    local_path_params = ("model", "pretrained")

    @cached_property
    def dim(self) -> int:
        return _embedding_dim(self.params, self.checkpoint(weights=False),
                              self.load_revision())

    def extras(self):
        return ("models",) + (("openclip",) if self.params.backend == "open_clip" else ())

    def reads(self):
        return (self.params.text_column,) if self.params.text_column else ()

    def written_names(self) -> tuple[str, ...]:
        return ("clip_embedding",) + (
            ("clip_text_embedding",) if self.params.text_column else ())

    def writes(self):
        return {name: vector_type(self.dim) for name in self.written_names()}

    @cached_property
    def pretrained_tag(self) -> str | None:
        """The version tag of open_clip weights in object storage, taken where the run
        starts (workers load that version, and a rewritten object recomputes the rows)."""
        p = self.params
        if not (p.pretrained and objstore.is_object_uri(p.pretrained)):
            return None
        try:
            return objstore.head(p.pretrained, p.storage_options, quick=True)[1]
        except MediaError:  # preflight's load says why, before any work
            return "unreadable"

    def row_fingerprint(self):
        fingerprint = super().row_fingerprint()
        if self.params.backend == "transformers":
            fingerprint["processor"] = "pil"  # images prepared by PIL's processors
        if self.pretrained_tag:
            fingerprint["pretrained_tag"] = self.pretrained_tag
        return fingerprint

    def preflight(self):
        p = self.params
        if p.backend == "transformers" and (problems := super().preflight()):
            return problems
        try:
            self.dim  # noqa: B018 (reads the model config: fails early when it is unusable)
        except Exception as exc:  # transformers/open_clip raise many kinds
            return [("model", f"cannot read the config of {p.model!r}: {exc}")]
        return []

    def _load(self, load_weights: bool):
        from curate.models.embedders import load_embedder

        p = self.params
        pretrained = p.pretrained
        if self.pretrained_tag and load_weights:  # the version the run started with
            from curate.models.checkpoints import local_file

            folder = hashlib.sha256(f"{pretrained}\n{self.pretrained_tag}".encode())
            pretrained = str(local_file(pretrained, p.storage_options,
                                        f"weights/{folder.hexdigest()[:16]}",
                                        tag=self.pretrained_tag))
        return load_embedder(p.backend, self.checkpoint(load_weights),
                             revision=self.load_revision(),
                             device=p.device, dtype=p.dtype, pretrained=pretrained,
                             load_weights=load_weights)

    @cached_property
    def _preprocessor(self):
        return self._load(load_weights=False)

    def prepare(self, batch, images):
        return prepared_pixels(self._preprocessor.prepare, images)

    def setup(self):
        self.embedder = self._load(load_weights=True)

    def process(self, batch, images):
        pixels, valid = column_pixels(batch[self.prepared_column], self.embedder.input_shape)
        size = self.resources.batch_size
        out = np.zeros((len(valid), self.dim), np.float32)
        if len(pixels):
            out[valid] = in_fixed_batches(self.embedder.embed_pixels, pixels, size)
        columns = {"clip_embedding": from_matrix(out, valid)}
        if self.params.text_column:
            texts = batch[self.params.text_column].to_pylist()
            has_text = np.array([bool(t and t.strip()) for t in texts], bool)
            text_out = np.zeros((len(texts), self.dim), np.float32)
            if has_text.any():
                text_out[has_text] = in_fixed_batches(
                    self.embedder.embed_texts, [t for t, ok in zip(texts, has_text) if ok],
                    size, "")
            columns["clip_text_embedding"] = from_matrix(text_out, has_text)
        return columns
