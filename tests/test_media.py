"""Safe decoding: every kind of bad or odd input, on real photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curate.media.decode import MediaError, decode_image, error_code, read_local

BIG = 64_000_000


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.coffee())  # 600 x 400


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def code_of(data: bytes, max_pixels: int = BIG) -> str:
    with pytest.raises(MediaError) as info:
        decode_image(data, max_pixels)
    return info.value.code


def test_jpeg_decodes_with_size_and_format(photo):
    out = decode_image(encode(photo, "JPEG"), BIG)
    assert (out.width, out.height, out.format, out.num_frames) == (600, 400, "JPEG", 1)
    assert out.image.mode == "RGB" and out.image.size == (600, 400)


def test_downscaled_copy_keeps_original_size(photo):
    out = decode_image(encode(photo, "JPEG"), BIG, max_side=200)
    assert (out.width, out.height) == (600, 400)
    assert max(out.image.size) == 200


def test_bad_inputs_become_coded_errors(photo):
    whole = encode(photo, "JPEG")
    assert code_of(b"") == "empty"
    assert code_of(whole[: len(whole) // 2]) == "truncated"
    assert code_of(b"plain text, not pixels\n" * 10) == "not_an_image"
    assert code_of(whole[:40] + bytes(2000)) in ("corrupt", "truncated")
    assert code_of(encode(photo, "PNG"), max_pixels=1000) == "too_large"


def test_decompression_bomb_is_refused_before_decoding():
    # A 20000 x 20000 PNG of one colour compresses to a few hundred KB.
    bomb = encode(Image.new("L", (20000, 20000)), "PNG")
    assert len(bomb) < 2_000_000
    with pytest.raises(MediaError, match="too_large"):
        decode_image(bomb, max_pixels=50_000_000)


def test_file_size_cap(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 5000)
    with pytest.raises(MediaError, match="too_large"):
        read_local(str(path), max_bytes=4096)
    with pytest.raises(MediaError, match="missing"):
        read_local(str(tmp_path / "nope.jpg"), max_bytes=4096)


def test_format_is_sniffed_not_taken_from_the_name(photo, tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(encode(photo, "PNG"))
    assert decode_image(read_local(str(path), 10**8), BIG).format == "PNG"


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "P", "RGBA", "LA", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(photo, mode):
    if mode in ("I;16", "I"):
        arr = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
        img = Image.fromarray(arr.astype(np.uint16 if mode == "I;16" else np.int32))
        fmt = "PNG" if mode == "I;16" else "TIFF"
    elif mode == "F":
        img = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.float32) / 255.0)
        fmt = "TIFF"
    else:
        img = photo.convert(mode)
        fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    out = decode_image(encode(img, fmt), BIG)
    assert out.image.mode == "RGB"
    gray = np.asarray(out.image.convert("L"), dtype=np.float32)
    reference = np.asarray(photo.convert("L"), dtype=np.float32)
    if mode != "1":  # 1-bit dithers; every other mode keeps the picture
        assert abs(gray.mean() - reference.mean()) < 12, mode
        assert np.corrcoef(gray.ravel(), reference.ravel())[0, 1] > 0.9, mode


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 64))
    out = decode_image(encode(rgba, "PNG"), BIG).image
    assert out.getpixel((48, 10)) == (255, 255, 255)
    assert out.getpixel((10, 10)) == (0, 0, 255)
    palette = rgba.convert("P")
    palette.info["transparency"] = palette.getpixel((48, 10))
    out = decode_image(encode(palette, "PNG", transparency=palette.getpixel((48, 10))), BIG)
    assert out.image.getpixel((48, 10)) == (255, 255, 255)


def test_exif_orientation_is_applied(photo):
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # 400 x 600 on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), BIG)
    assert (out.width, out.height) == (600, 400)
    upright = np.asarray(out.image.convert("L"), dtype=np.float32)
    reference = np.asarray(photo.convert("L"), dtype=np.float32)
    assert np.abs(upright - reference).mean() < 8


def test_animated_and_multipage_use_the_first_frame(photo):
    frames = [photo.resize((120, 80)), Image.new("RGB", (120, 80), (0, 255, 0))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(gif, BIG)
    assert out.num_frames == 2
    assert out.image.getpixel((60, 40)) != (0, 255, 0)
    tiff = encode(frames[1], "TIFF", save_all=True, append_images=[frames[0]])
    out = decode_image(tiff, BIG)
    assert out.num_frames == 2 and out.image.getpixel((60, 40)) == (0, 255, 0)


def test_error_code_parsing():
    assert error_code("truncated: cannot decode") == "truncated"
    assert error_code("blur 3.1 < 10; min_side 5 < 9") == "blur"
    assert error_code(None) is None


def test_a_run_over_real_world_damage_keeps_one_row_per_file_and_exits_0(tmp_path):
    """Quirky files (pixels intact, metadata odd) are kept with a `decode_warning`; broken
    ones are one row each with an `error`; nothing ends the run."""
    import json
    import struct
    import subprocess
    import sys

    import lance
    import skimage.data
    import yaml

    from tests.conftest import ROOT
    from tests.test_media_fuzz import jpeg_metadata_damage, png_metadata_damage

    cat = Image.fromarray(skimage.data.chelsea())
    rocket = Image.fromarray(skimage.data.rocket())
    media = tmp_path / "media"
    media.mkdir()
    jpeg, png = encode(cat, "JPEG", quality=90), encode(rocket, "PNG")
    quirky = {f"q_jpeg_{n}.jpg": d for n, (_, d) in enumerate(jpeg_metadata_damage(jpeg))}
    quirky |= {f"q_png_{n}.png": d for n, (_, d) in enumerate(png_metadata_damage(png))}
    quirky |= {"q_missing_eoi.jpg": jpeg[:-2], "q_png_named.jpg": png}
    tiff = bytearray(encode(cat, "TIFF"))
    (ifd,) = struct.unpack_from("<I", tiff, 4)
    for k in range(struct.unpack_from("<H", tiff, ifd)[0]):
        if struct.unpack_from("<H", tiff, ifd + 2 + 12 * k)[0] in (256, 257):
            struct.pack_into("<H", tiff, ifd + 2 + 12 * k, 65000)  # dimensions gone
    scan = jpeg.index(b"\xff\xda")
    broken = {"b_tiff_no_size.tif": bytes(tiff), "b_half.jpg": jpeg[:len(jpeg) // 2],
              "b_coded_data.jpg": jpeg[:scan + 900] + bytes(range(64)) + jpeg[scan + 964:],
              "b_png_cut.png": png[:len(png) // 2], "b_empty.jpg": b"",
              "b_text.png": b"not an image\n" * 20}
    for name, data in {**quirky, **broken, "good.jpg": jpeg}.items():
        (media / name).write_bytes(data)
    config = {"name": "quirks", "store": {"uri": str(tmp_path / "store")},
              "run": {"executor": "local"},
              "stages": [{"type": "ingest_images", "paths": [str(media)]},
                         {"type": "image_quality", "min_side": 16}]}
    path = tmp_path / "quirks.yaml"
    path.write_text(yaml.safe_dump(config))

    def run(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "curate", "run", str(path), "--no-progress",
                               "--json", str(tmp_path / "out.json"), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        return json.loads((tmp_path / "out.json").read_text())

    def table():
        return lance.dataset(str(tmp_path / "store" / "samples.lance")).to_table()

    assert run()["rows_processed"] == len(quirky) + len(broken) + 1
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in table().to_pylist()}
    assert sorted(rows) == sorted([*quirky, *broken, "good.jpg"])
    for name in broken:
        assert rows[name]["error"], name
    assert rows["b_tiff_no_size.tif"]["error"].startswith("corrupt")
    for name in [*quirky, "good.jpg"]:
        assert rows[name]["error"] is None, (name, rows[name]["error"])
        assert (rows[name]["width"], rows[name]["height"]) in (cat.size, rocket.size)
    assert rows["good.jpg"]["decode_warning"] is None
    assert "end-of-image" in rows["q_missing_eoi.jpg"]["decode_warning"]
    assert sum(rows[n]["decode_warning"] is not None for n in quirky) >= 14
    # rows refused for a code named in run.retry_errors are read again, and only they
    first = table().sort_by("sample_id")
    assert run()["rows_processed"] == 0
    corrupt = sum(1 for r in rows.values() if (r["error"] or "").startswith("corrupt:"))
    assert corrupt >= 2
    assert run("--set", "run.retry_errors=[corrupt]")["rows_processed"] == corrupt
    kept = ["sample_id", "uri", "width", "height", "content_hash", "decode_warning", "error"]
    assert table().sort_by("sample_id").select(kept).equals(first.select(kept))


def test_running_out_of_memory_is_the_rows_error_and_retried_next_run(photo, monkeypatch):
    from curate.engine.inputs import done_filter
    from curate.media import decode as media

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(media.Image, "open", exhausted)
    with pytest.raises(MediaError) as info:
        decode_image(encode(photo, "PNG"), BIG)
    assert info.value.code == "out_of_memory"
    assert "error LIKE 'out_of_memory:%'" in done_filter("h")
