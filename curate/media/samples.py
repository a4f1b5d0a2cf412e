"""Photo-like test images made from the real photos that ship with scikit-image, for
tests, benchmarks and trying curate out without a dataset."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
           "immunohistochemistry", "colorwheel")


def base_photos() -> list[Image.Image]:
    try:
        import skimage.data as data
    except ImportError as exc:
        raise ImportError("sample media needs scikit-image: pip install 'curate[dev]'") from exc
    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in _PHOTOS]


def photo_like(rng: np.random.Generator, bases: list[Image.Image],
               size: tuple[int, int] = (1024, 768)) -> Image.Image:
    """A random crop of a real photo, flipped, colour-jittered and resized to `size`."""
    base = bases[int(rng.integers(len(bases)))]
    w, h = base.size
    cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = base.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    img = img.resize(size, Image.Resampling.BILINEAR)
    noise = rng.normal(0, 4, (size[1], size[0], 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def write_photos(directory: str | Path, count: int, size: tuple[int, int] = (1024, 768),
                 seed: int = 0, quality: int = 90) -> list[Path]:
    """Write `count` photo-like JPEGs into `directory`; returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = base_photos()
    paths = []
    for i in range(count):
        path = out / f"photo_{i:06d}.jpg"
        buf = io.BytesIO()
        photo_like(rng, bases, size).save(buf, format="JPEG", quality=quality)
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def scene_frames(rng: np.random.Generator, bases: list[Image.Image], seconds: float,
                 size: tuple[int, int], fps: int, still: bool = False):
    """Frames of one shot: a slow pan and zoom over a real photo (or a still one)."""
    base = bases[int(rng.integers(len(bases)))]
    w, h = base.size
    frames = max(1, round(seconds * fps))
    zoom0, zoom1 = rng.uniform(0.55, 0.8), rng.uniform(0.55, 0.8)
    x0, y0, x1, y1 = rng.uniform(0, 1, 4)
    aspect = size[0] / size[1]
    for k in range(frames):
        t = 0.0 if still else k / max(frames - 1, 1)
        zoom = zoom0 + (zoom1 - zoom0) * t
        cw = min(w, h * aspect) * zoom
        ch = cw / aspect
        x = (x0 + (x1 - x0) * t) * (w - cw)
        y = (y0 + (y1 - y0) * t) * (h - ch)
        crop = base.crop((int(x), int(y), int(x + cw), int(y + ch)))
        yield np.asarray(crop.resize(size, Image.Resampling.BILINEAR), np.uint8)


def write_video_with_cuts(path: str | Path, shots: list[float], size: tuple[int, int] = (640, 360),
                          fps: int = 24, seed: int = 0, still: bool = False) -> list[int]:
    """A video of shots of the given lengths (seconds), each a pan over another real photo;
    returns the frame index where each shot after the first starts (the true cuts)."""
    from curate.media.video import write_video

    rng = np.random.default_rng(seed)
    bases = base_photos()
    order = rng.permutation(len(bases))
    cuts, at = [], 0

    def all_frames():
        nonlocal at
        for n, seconds in enumerate(shots):
            if n:
                cuts.append(at)
            # consecutive shots show different photos, so every cut is a real one
            chosen = [bases[order[n % len(order)]]]
            for pixels in scene_frames(rng, chosen, seconds, size, fps, still):
                at += 1
                yield pixels

    write_video(str(path), all_frames(), fps=fps)
    return cuts
