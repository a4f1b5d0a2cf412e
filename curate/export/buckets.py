"""Aspect-ratio buckets: each sample is given the training resolution whose aspect ratio is
nearest its own, as text-to-image trainers batch by bucket."""

from __future__ import annotations

import math

import numpy as np

#: SDXL's training resolutions (width x height), about one megapixel each.
SDXL = ("512x2048", "512x1984", "512x1920", "512x1856", "576x1792", "576x1728", "576x1664",
        "640x1600", "640x1536", "704x1472", "704x1408", "704x1344", "768x1344", "768x1280",
        "832x1216", "832x1152", "896x1152", "896x1088", "960x1088", "960x1024", "1024x1024",
        "1024x960", "1088x960", "1088x896", "1152x896", "1152x832", "1216x832", "1280x768",
        "1344x768", "1344x704", "1408x704", "1472x704", "1536x640", "1600x640", "1664x576",
        "1728x576", "1792x576", "1856x512", "1920x512", "1984x512", "2048x512")
NAMED = {"sdxl": SDXL}


def parse_buckets(spec: str) -> tuple[str, ...]:
    """`sdxl`, or resolutions as `WxH,WxH,...`; ValueError naming what is wrong."""
    if spec.strip().lower() in NAMED:
        return NAMED[spec.strip().lower()]
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        w, sep, h = item.lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
            raise ValueError(f"bucket {item!r} is not WIDTHxHEIGHT (e.g. 1024x1024); known "
                             f"lists: {', '.join(NAMED)}")
        out.append(f"{int(w)}x{int(h)}")
    if not out:
        raise ValueError(f"no buckets in {spec!r}; give WxH,WxH,... or one of {', '.join(NAMED)}")
    return tuple(dict.fromkeys(out))


def assign(widths: np.ndarray, heights: np.ndarray, buckets: tuple[str, ...]) -> np.ndarray:
    """Index of each sample's bucket: the nearest aspect ratio on a log scale (ties go to
    the earlier bucket); -1 where a size is unknown."""
    logs = np.array([math.log(int(w) / int(h)) for w, h in (b.split("x") for b in buckets)])
    w = np.asarray(widths, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)
    known = (w > 0) & (h > 0)
    ratio = np.log(np.where(known, w, 1.0) / np.where(known, h, 1.0))
    index = np.abs(ratio[:, None] - logs[None, :]).argmin(axis=1)
    return np.where(known, index, -1)
