"""image_quality: cheap pixel and file statistics, each with an optional threshold."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, model_validator

from curate.media.decode import luma
from curate.stage import FrameScoreParams, ScoreFilter, Threshold


class QualityParams(FrameScoreParams):
    min_side: int | None = Field(None, ge=1, description="minimum of width and height, px")
    max_side: int | None = Field(None, ge=1, description="maximum of width and height, px")
    min_aspect_ratio: float | None = Field(None, gt=0, description="minimum width / height")
    max_aspect_ratio: float | None = Field(None, gt=0, description="maximum width / height")
    min_bytes: int | None = Field(None, ge=0, description="minimum file size in bytes")
    max_bytes: int | None = Field(None, ge=1, description="maximum file size in bytes")
    min_blur: float | None = Field(
        None, ge=0, description="minimum variance of the Laplacian (higher = sharper)"
    )
    min_brightness: float | None = Field(None, ge=0, le=255, description="mean luma, 0-255")
    max_brightness: float | None = Field(None, ge=0, le=255, description="mean luma, 0-255")
    min_contrast: float | None = Field(None, ge=0, description="std of luma, 0-255 scale")
    min_saturation: float | None = Field(
        None, ge=0, le=255,
        description="mean HSV S, 0-255 (from 384 px on the short side: of every third pixel)")
    max_saturation: float | None = Field(
        None, ge=0, le=255,
        description="mean HSV S, 0-255 (from 384 px on the short side: of every third pixel)")

    @model_validator(mode="after")
    def _ranges(self):
        for low, high in (
            ("min_side", "max_side"),
            ("min_aspect_ratio", "max_aspect_ratio"),
            ("min_bytes", "max_bytes"),
            ("min_brightness", "max_brightness"),
            ("min_saturation", "max_saturation"),
        ):
            a, b = getattr(self, low), getattr(self, high)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{low} ({a}) is greater than {high} ({b})")
        return self


def image_scores(img: Image.Image) -> tuple[float, float, float, float]:
    """(blur, brightness, contrast, saturation) of an RGB image.

    blur is the variance of the 4-neighbour Laplacian of the luma; all others are on the
    0-255 scale. Computed on the image as decoded for analysis (see decode_max_side).
    Brightness and contrast come exactly from the luma's histogram and blur exactly from
    integer sums. Saturation is the mean of PIL's HSV saturation, looked up per pixel from
    (max, max - min) of its channels: over every pixel of an image under `SAMPLE_FROM` px
    on its short side, else over every third pixel of every third row (on photos within
    0.5% of the mean over all pixels; a step of 3 stays off the 2- and 8-pixel grids of
    JPEG's chroma and blocks). The array work runs in NumPy, OpenCV and PIL without
    Python's GIL, so the threads of a run on one machine share the CPUs.
    """
    gray_image = luma(img)
    count = img.size[0] * img.size[1]
    histogram = np.asarray(gray_image.histogram(), dtype=np.float64)
    brightness = float(histogram @ _LEVELS) / count
    variance = float(histogram @ (_LEVELS * _LEVELS)) / count - brightness * brightness
    return (_laplacian_variance(np.asarray(gray_image)), brightness,
            math.sqrt(max(variance, 0.0)), _mean_saturation(img))


_LEVELS = np.arange(256, dtype=np.float64)
#: Short side (px) from which saturation is averaged over a 1-in-9 grid of pixels.
SAMPLE_FROM = 384
_SATURATION: np.ndarray | None = None


def _laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior of a uint8 image, exact:
    OpenCV's Laplacian into int16 (|values| <= 1020) and its integer sums, which run in
    SIMD without the GIL (NumPy's version of the same sums took twice as long)."""
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    cv2 = _opencv()
    lap = cv2.Laplacian(gray, cv2.CV_16S, ksize=1)[1:-1, 1:-1]
    squares, total = cv2.norm(lap, cv2.NORM_L2SQR), cv2.sumElems(lap)[0]
    return squares / lap.size - (total / lap.size) ** 2


def _opencv():
    """cv2, with its own thread pool off unless OPENCV_FOR_THREADS_NUM says otherwise: a
    run already keeps a thread or worker per CPU busy, and OpenCV's threads on top of them
    made the 5,000-photo benchmark 19% slower."""
    import cv2

    if "OPENCV_FOR_THREADS_NUM" not in os.environ and cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


def _saturation_table() -> np.ndarray:
    """PIL's HSV saturation for each (max, max - min) of a pixel's channels, which is all
    it depends on, at index max * 256 + (max - min); made by PIL itself from an image
    holding every pair."""
    high = np.repeat(np.arange(256), 256)
    spread = np.tile(np.arange(256), 256)
    valid = spread <= high
    low = np.where(valid, high - spread, high).astype(np.uint8)
    pixels = np.stack([high.astype(np.uint8), low, low], axis=-1).reshape(256, 256, 3)
    table = np.asarray(Image.fromarray(pixels, "RGB").convert("HSV"))[..., 1].reshape(-1)
    return np.where(valid, table, 0).astype(np.uint8)


def _mean_saturation(img: Image.Image) -> float:
    global _SATURATION
    if _SATURATION is None:
        _SATURATION = _saturation_table()
    width, height = img.size
    if min(width, height) >= SAMPLE_FROM:  # pixels (3i + 1, 3j + 1), picked by PIL in C
        img = img.resize((width // 3, height // 3), Image.NEAREST,
                         box=(0, 0, width // 3 * 3, height // 3 * 3))
    pixels = np.asarray(img)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    high = np.maximum(np.maximum(r, g), b)
    index = high.astype(np.uint16)
    index <<= 8
    index |= high - np.minimum(np.minimum(r, g), b)
    values = np.take(_SATURATION, index)
    return float(values.sum(dtype=np.uint64)) / max(values.size, 1)


#: The score columns, in the order `image_scores` gives the last four.
SCORES = ("aspect_ratio", "blur", "brightness", "contrast", "saturation")


class ImageQuality(ScoreFilter):
    """Score size, aspect ratio, file size, blur, brightness, contrast and saturation."""

    type = "image_quality"
    Params = QualityParams
    params: QualityParams
    verdict_column = "quality_reason"
    threshold_params = ("min_side", "max_side", "min_aspect_ratio", "max_aspect_ratio",
                        "min_bytes", "max_bytes", "min_blur", "min_brightness",
                        "max_brightness", "min_contrast", "min_saturation", "max_saturation")

    def reads(self) -> tuple[str, ...]:
        return ("width", "height", "num_bytes")

    def verdict_reads(self) -> tuple[str, ...]:
        return (*self.reads(), *SCORES)

    def thresholds(self) -> list[Threshold]:
        """The limits on its score columns (for review queues; `verdicts` is its own, as
        some checks are on width, height and bytes)."""
        p = self.params
        return [Threshold("aspect_ratio", "aspect_ratio", p.min_aspect_ratio,
                          p.max_aspect_ratio),
                Threshold("blur", "blur", p.min_blur),
                Threshold("brightness", "brightness", p.min_brightness, p.max_brightness),
                Threshold("contrast", "contrast", p.min_contrast),
                Threshold("saturation", "saturation", p.min_saturation, p.max_saturation)]

    def writes(self) -> dict[str, pa.DataType]:
        return {
            "aspect_ratio": pa.float32(),
            "blur": pa.float32(),
            "brightness": pa.float32(),
            "contrast": pa.float32(),
            "saturation": pa.float32(),
            "quality_reason": pa.string(),
        }

    def needs_pixels(self) -> bool:
        return True

    def row_fingerprint(self) -> dict:
        # rows scored before saturation came from a grid of pixels are scored again
        return {**super().row_fingerprint(), "saturation_grid": [SAMPLE_FROM, 3]}

    def score(self, batch: pa.Table, images: list) -> dict[str, pa.Array]:
        out: dict[str, list] = {k: [] for k in SCORES}
        for img, w, h in zip(images, batch["width"].to_pylist(), batch["height"].to_pylist()):
            scores = (w / h, *image_scores(img)) if img is not None else (None,) * len(SCORES)
            for name, value in zip(SCORES, scores):
                out[name].append(value)
        return {k: pa.array(v, pa.float32()) for k, v in out.items()}

    def _failed(self, w, h, nbytes, aspect, blur, brightness, contrast, saturation):
        """The checks a row fails, as `blur 3.1 < 10; ...`, or None."""
        p = self.params
        checks = (
            ("min_side", min(w, h), p.min_side, False),
            ("max_side", max(w, h), p.max_side, True),
            ("aspect_ratio", aspect, p.min_aspect_ratio, False),
            ("aspect_ratio", aspect, p.max_aspect_ratio, True),
            ("bytes", nbytes, p.min_bytes, False),
            ("bytes", nbytes, p.max_bytes, True),
            ("blur", blur, p.min_blur, False),
            ("brightness", brightness, p.min_brightness, False),
            ("brightness", brightness, p.max_brightness, True),
            ("contrast", contrast, p.min_contrast, False),
            ("saturation", saturation, p.min_saturation, False),
            ("saturation", saturation, p.max_saturation, True),
        )
        failed = [
            f"{label} {_fmt(value)} {'>' if upper else '<'} {_fmt(limit)}"
            for label, value, limit, upper in checks
            if limit is not None and (value > limit if upper else value < limit)
        ]
        return "; ".join(failed) or None

    def verdicts(self, rows: pa.Table, columns: dict[str, pa.Array]) -> pa.Array:
        """The checks on the stored scores (on a clip, its frames' reduced scores: their
        mean by default) and on the rows' sizes."""
        values = [columns[n].to_pylist() for n in SCORES]
        out = []
        for w, h, nbytes, *scores in zip(rows["width"].to_pylist(), rows["height"].to_pylist(),
                                         rows["num_bytes"].to_pylist(), *values):
            out.append(None if scores[1] is None or not w or not h else
                       self._failed(w, h, nbytes, *scores))
        return pa.array(out, pa.string())


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, int) else f"{x:.4g}"
