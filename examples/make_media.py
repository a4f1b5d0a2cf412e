"""Regenerate examples/media/ from sample images that ship inside scikit-image and
scikit-learn (see examples/MEDIA_LICENSES.md). Run: python examples/make_media.py"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parent / "media"


def photos() -> dict[str, Image.Image]:
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    out = {
        name: Image.fromarray(getattr(data, name)())
        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                     "immunohistochemistry", "camera", "brick")
    }
    out["retina"] = Image.fromarray(data.retina()).resize((1024, 1024), Image.Resampling.LANCZOS)
    china, flower = load_sample_images().images
    out["china"] = Image.fromarray(china)
    out["flower"] = Image.fromarray(flower)
    return out


def save(img: Image.Image, rel: str, **kwargs) -> Path:
    path = OUT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    import skimage.data as skimage_data

    src = photos()
    # Originals: the photos themselves, in a few formats and modes.
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                 "immunohistochemistry", "china", "flower"):
        save(src[name], f"photos/{name}.jpg", quality=90)
    save(src["camera"], "photos/camera.png")  # 8-bit grayscale
    save(src["brick"], "photos/brick.png")

    # Near-duplicates (phash_dedup) and an exact copy (exact_dedup).
    astro = src["astronaut"]
    save(astro.resize((384, 384), Image.Resampling.LANCZOS), "variants/astronaut_resized.jpg",
         quality=85)
    save(src["chelsea"], "variants/chelsea_recompressed.jpg", quality=35)
    w, h = src["coffee"].size
    save(src["coffee"].crop((12, 8, w - 12, h - 8)), "variants/coffee_cropped.jpg", quality=90)
    marked = src["china"].copy()
    ImageDraw.Draw(marked).text((20, marked.height - 40), "(c) stock-photos.example",
                                fill=(255, 255, 255))
    save(marked, "variants/china_watermarked.jpg", quality=90)
    shutil.copy(OUT / "photos/flower.jpg", OUT / "variants/flower_copy.jpg")
    # Same photo, other encodings: EXIF-rotated JPEG, CMYK JPEG, 16-bit PNG.
    rotated = src["rocket"].transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate it 90 degrees clockwise, back to upright
    save(rotated, "variants/rocket_exif_rotated.jpg", quality=90, exif=exif.tobytes())
    save(src["hubble_deep_field"].convert("CMYK"), "variants/hubble_cmyk.jpg", quality=90)
    sixteen = (np.asarray(src["camera"], dtype=np.uint16) * 257).astype(np.uint16)
    save(Image.fromarray(sixteen), "variants/camera_16bit.png")

    # Images the quality filter should drop.
    save(src["coffee"].resize((96, 64)), "low_quality/coffee_thumbnail.jpg", quality=90)
    save(src["immunohistochemistry"].filter(ImageFilter.GaussianBlur(8)),
         "low_quality/blurred.jpg", quality=90)
    dark = Image.eval(src["chelsea"], lambda v: v // 12)
    save(dark, "low_quality/underexposed.jpg", quality=90)
    banner = src["china"].resize((640, 80))
    save(banner, "low_quality/banner.jpg", quality=90)

    # Odd but valid files: palette GIF with transparency and 3 frames, RGBA PNG, a PNG
    # whose name says JPEG.
    frames = [src["flower"].resize((320, 213)).rotate(angle).quantize(64) for angle in (0, 4, 8)]
    save(frames[0], "odd/animated.gif", save_all=True, append_images=frames[1:],
         transparency=0, duration=100)
    save(Image.fromarray(skimage_data.logo()), "odd/logo_rgba.png")
    buf = io.BytesIO()
    src["rocket"].save(buf, format="PNG")
    (OUT / "odd/really_a_png.jpg").write_bytes(buf.getvalue())

    # Broken files: each becomes a row with an error.
    broken = OUT / "broken"
    broken.mkdir()
    (broken / "empty.jpg").write_bytes(b"")
    whole = (OUT / "photos/coffee.jpg").read_bytes()
    (broken / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (broken / "notes.png").write_text("this is a text file with an image extension\n")
    header = bytearray(whole[:2000])
    (broken / "garbage.webp").write_bytes(bytes(b ^ 0x5A for b in header))

    # A WebDataset shard: two samples with captions, one without an image.
    with tarfile.open(OUT / "shard-000000.tar", "w") as tar:
        for key, img, caption in (("000001", src["coffee"], "a cup of coffee on a saucer"),
                                  ("000002", src["rocket"].resize((320, 213)),
                                   "a rocket on the launch pad")):
            for ext, payload in (("jpg", _jpeg(img)), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("000003.txt")
        text = b"a caption whose image is missing"
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    count = sum(1 for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {count} files, {total / 1e6:.1f} MB, to {OUT}")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


if __name__ == "__main__":
    main()
