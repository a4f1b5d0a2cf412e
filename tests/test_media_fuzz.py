"""Damaged files never pass as good ones: seeded byte mutations of real photos in every
format are either refused with an error, or decode completely with no error or warning
from a strict, independent decode."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from curate.media import MediaError, decode_image

BIG = 64_000_000
FORMATS = {"JPEG": {"quality": 90}, "PNG": {}, "WEBP": {"quality": 90}, "GIF": {},
           "TIFF": {"compression": "tiff_lzw"}}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.coffee()).resize((512, 342))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    (img.quantize(128) if fmt == "GIF" else img).save(buf, format=fmt, **FORMATS[fmt])
    return buf.getvalue()


def mutants(data: bytes, seed: int):
    """(kind, offset, bytes): a flipped byte, a cut-off and a random 64-byte block at each
    of 40 offsets spread over the file, headers included."""
    rng = np.random.default_rng(seed)
    for offset in sorted({int(o) for o in np.linspace(0, len(data) - 1, 40)}):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << int(rng.integers(8))
        yield "flip", offset, bytes(flipped)
        yield "cut", offset, data[:offset]
        block = bytearray(data)
        block[offset:offset + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        yield "block", offset, bytes(block[:len(data)])


def strict_fault(data: bytes, fmt: str) -> str | None:
    """What a strict decode independent of curate finds wrong, or None.

    PIL with every warning an error and no truncated images; for JPEG also libjpeg-turbo
    with its warnings as errors; for PNG also every chunk's checksum, up to IEND."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            img.getexif()
        except Exception as exc:
            return f"PIL: {exc}"
    if fmt == "JPEG":
        import simplejpeg

        try:
            simplejpeg.decode_jpeg(data, strict=True)
        except ValueError as exc:
            return f"libjpeg: {exc}"
    if fmt == "PNG":
        pos = 8
        while True:
            if pos + 12 > len(data):
                return "PNG without IEND"
            (length,) = struct.unpack_from(">I", data, pos)
            body = data[pos + 4:pos + 8 + length]
            crc = data[pos + 8 + length:pos + 12 + length]
            if len(crc) < 4 or zlib.crc32(body) != struct.unpack(">I", crc)[0]:
                return f"PNG chunk {body[:4]!r} fails its checksum"
            if body[:4] == b"IEND":
                return None
            pos += 12 + length
    return None


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_mutant_is_refused_or_decoded_whole(photo, fmt):
    data = encode(photo, fmt)
    refused = accepted = 0
    for kind, offset, mutant in mutants(data, seed=len(fmt)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing curate accepts may have warned
            try:
                out = decode_image(mutant, BIG)
            except MediaError as exc:
                refused += 1
                assert exc.code in ("corrupt", "truncated", "not_an_image", "empty"), exc
                continue
        accepted += 1
        fault = strict_fault(mutant, fmt)
        assert fault is None, f"{fmt} {kind} at byte {offset} was accepted: {fault}"
        assert out.image.size == (out.width, out.height) == photo.size
    # every cut-off is refused (a PNG's checksums refuse every other mutant too); a flip
    # that only changes pixel values may pass
    assert refused >= 40, (refused, accepted)


def test_a_png_with_random_bytes_in_its_image_data_is_refused(photo):
    data = bytearray(encode(photo, "PNG"))
    idat = data.index(b"IDAT")
    middle = idat + (len(data) - idat) // 2
    data[middle:middle + 64] = np.random.default_rng(0).integers(0, 256, 64,
                                                                  dtype=np.uint8).tobytes()
    with pytest.raises(MediaError, match=r"^(corrupt|truncated)"):
        decode_image(bytes(data), BIG)


def test_a_jpeg_libjpeg_only_warns_about_is_refused(photo):
    data = bytearray(encode(photo, "JPEG"))
    scan = data.index(b"\xff\xda")  # start of scan: entropy-coded data follows
    middle = scan + (len(data) - scan) // 2
    data[middle:middle + 64] = bytes(range(64))  # no 0xFF: PIL decodes it without a word
    Image.open(io.BytesIO(bytes(data))).load()
    with pytest.raises(MediaError, match="corrupt: cannot decode JPEG: Corrupt JPEG data"):
        decode_image(bytes(data), BIG)


def test_a_warning_pil_emits_for_damaged_data_refuses_the_file(photo):
    # A TIFF whose ImageDescription claims more bytes than the file holds: PIL skips the
    # tag with a "Tag data larger than file" warning and decodes the pixels.
    buf = io.BytesIO()
    photo.save(buf, format="TIFF", tiffinfo={270: "a description of the photo"})
    data = bytearray(buf.getvalue())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == 270:
            struct.pack_into("<I", data, entry + 4, 10_000_000)
    with pytest.warns(UserWarning, match="Tag data larger than file"):
        Image.open(io.BytesIO(bytes(data))).load()
    with pytest.raises(MediaError, match="corrupt: TIFF decoder warned: Tag data larger than file"):
        decode_image(bytes(data), BIG)
