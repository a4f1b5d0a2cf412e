"""Small heads over CLIP embeddings (LAION aesthetic predictor, NSFW heads).

Weights come from a local path, an http(s) URL or an object in storage (`s3://`) and are
checked by sha256 before use.
A head is a stack of linear layers read from a PyTorch (`.pth`/`.pt`) or safetensors
state dict in key order; it runs in numpy, so no torch is needed at inference.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from curate.models import ModelError, file_sha256, require


def fetch_weights(uri: str, sha256: str, options: dict | None = None,
                  timeout: float = 60.0) -> Path:
    """A local, verified copy of the weights at `uri` (a path, an http(s) URL, or an object
    in storage reached with `options`; downloaded once into the cache)."""
    from curate.media import objstore
    from curate.models.checkpoints import cache_root, local_file

    if objstore.is_object_uri(uri):
        path = local_file(uri, options, f"weights/{sha256.lower()}")
    elif uri.startswith(("http://", "https://")):
        name = Path(urllib.request.urlparse(uri).path).name or "weights"
        path = cache_root() / "weights" / sha256 / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with urllib.request.urlopen(uri, timeout=timeout) as response, \
                        tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                    shutil.copyfileobj(response, tmp)
            except OSError as exc:
                raise ModelError(f"cannot download weights from {uri}: {exc}") from None
            os.replace(tmp.name, path)
    else:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise ModelError(f"weights file {uri} does not exist")
    actual = file_sha256(path)
    if actual != sha256.lower():
        if cache_root() in path.parents:  # a wrong download is not kept for the next try
            path.unlink(missing_ok=True)
        raise ModelError(f"weights at {uri} have sha256 {actual}, but the config expects "
                         f"{sha256}; check the file or the sha256 in the config")
    return path


def _layer_order(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def load_linear_layers(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight (out, in), bias (out,)) of every linear layer in the state dict, in order."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        state = load_file(str(path))
    else:
        torch = require("torch", "models")
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several kinds for a bad file
            raise ModelError(f"cannot read weights {path}: {exc}") from None
        raw = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
        state = {k: v.float().numpy() for k, v in raw.items()}
    layers = []
    for key in sorted((k for k, v in state.items() if k.endswith("weight") and v.ndim == 2),
                      key=_layer_order):
        bias = state.get(key[: -len("weight")] + "bias")
        weight = state[key].astype(np.float32)
        layers.append((weight, np.zeros(weight.shape[0], np.float32) if bias is None
                       else bias.astype(np.float32)))
    if not layers:
        raise ModelError(f"{path} holds no linear layers")
    for (w1, _), (w2, _) in itertools.pairwise(layers):
        if w2.shape[1] != w1.shape[0]:
            raise ModelError(f"{path}: layers do not chain ({w1.shape} then {w2.shape})")
    return layers


class LinearHead:
    """Linear layers with an optional activation between them and on the output.

    The LAION aesthetic predictor is five linear layers with no activation (dropout only
    in training); NSFW heads use ReLU between layers and a sigmoid at the end.

    It computes in float64 and answers in float32: a BLAS product's last bits depend on
    where a row sits in the batch (edge tiles use other kernels), and a run's batches vary
    with scheduling; float64 keeps those differences far below float32's precision, so a
    row's score does not depend on its neighbours.
    """

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]], hidden: str = "none",
                 output: str = "none"):
        self.layers = [(np.asarray(w, np.float64), np.asarray(b, np.float64))
                       for w, b in layers]
        self.hidden = hidden
        self.output = output

    @property
    def input_dim(self) -> int:
        return self.layers[0][0].shape[1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1] != self.input_dim:
            raise ModelError(f"this head takes {self.input_dim}-d embeddings but got "
                             f"{x.shape[1]}-d ones; use the embedding model it was trained on")
        x = np.asarray(x, np.float64)
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T + bias
            if i < len(self.layers) - 1 and self.hidden == "relu":
                x = np.maximum(x, 0)
        if self.output == "sigmoid":
            x = 1 / (1 + np.exp(-x))
        return x[:, 0].astype(np.float32)
