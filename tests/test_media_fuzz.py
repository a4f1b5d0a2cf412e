"""Damage never passes as good pixels, and metadata damage never refuses good pixels.

The oracle is the undamaged original, decoded by PIL: each damaged copy (cut off at many
offsets, junk or broken metadata blocks put in, random bytes written over it) must be
refused with an error, or decode to exactly the original's pixels. Where the structure of
the file says every coded pixel is still there (a cut past the image data, a broken
metadata block), refusing it is a failure too, and so is decoding it without saying what
was odd when the decoder complained."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from curate.media.decode import MediaError, decode_image

BIG = 64_000_000
FORMATS = {"JPEG": {"quality": 90}, "PNG": {}, "WEBP": {"lossless": True}, "GIF": {},
           "TIFF": {"compression": "tiff_lzw"}, "BMP": {}}
CODES = ("corrupt", "truncated", "not_an_image", "empty")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.coffee()).resize((384, 256))


def encode(img: Image.Image, fmt: str, **extra) -> bytes:
    buf = io.BytesIO()
    (img.quantize(128) if fmt == "GIF" else img).save(buf, format=fmt, **FORMATS[fmt], **extra)
    return buf.getvalue()


def reference(data: bytes) -> np.ndarray:
    """The undamaged file's pixels as PIL decodes them (RGB)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def image_data_end(data: bytes, fmt: str) -> int:
    """The offset after the last byte of coded pixels in an undamaged file, read from the
    file's own structure."""
    if fmt == "JPEG":
        return data.rindex(b"\xff\xd9")  # the end-of-image marker follows the coded data
    if fmt == "PNG":
        idat = data.rindex(b"IDAT")
        (length,) = struct.unpack_from(">I", data, idat - 4)
        return idat + 4 + length + 4
    if fmt == "GIF":
        return len(data) - 2  # a block terminator and the trailer follow the last block
    return len(data)  # WEBP, BMP: the coded pixels run to the end; TIFF: the directory


def outcome(data: bytes) -> tuple[str, object]:
    try:
        return "kept", decode_image(data, BIG)
    except MediaError as exc:
        assert exc.code in CODES, exc
        return "refused", exc


def assert_exact(out, original: np.ndarray, what: str) -> None:
    got = np.asarray(out.image)
    assert got.shape == original.shape and np.array_equal(got, original), \
        f"{what}: decoded to other pixels"


def cuts(data: bytes):
    for offset in sorted({int(o) for o in np.linspace(1, len(data) - 1, 40)}
                         | {len(data) - 2, len(data) - 1}):
        yield offset, data[:offset]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_cut_off_file_is_refused_unless_every_coded_pixel_is_there(photo, fmt):
    data = encode(photo, fmt)
    original, end = reference(data), image_data_end(data, fmt)
    kept = refused = 0
    for offset, cut in cuts(data):
        result, out = outcome(cut)
        if offset < end:
            assert result == "refused", f"{fmt} cut at byte {offset} of {len(data)} was kept"
            refused += 1
        else:
            assert result == "kept", f"{fmt} cut at {offset}, past its image data: {out}"
            assert_exact(out, original, f"{fmt} cut at {offset}")
            kept += 1
    assert refused >= 35


def jpeg_metadata_damage(data: bytes):
    """(kind, bytes): a JPEG with junk or broken metadata, its coded data untouched."""
    sof = data.index(b"\xff\xc0")
    sos = data.index(b"\xff\xda")
    dqt = data.index(b"\xff\xdb")
    rng = np.random.default_rng(7)

    def junk(n):
        return bytes(int(b) for b in rng.integers(1, 255, n))

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body

    for at, name in ((2, "after SOI"), (dqt, "before DQT"), (sof, "before SOF"),
                     (sos, "before SOS")):
        for n in (1, 5):
            yield f"{n} junk bytes {name}", data[:at] + junk(n) + data[at:]
    yield "FF00 before the first marker", data[:2] + b"\xff\x00" + data[2:]
    yield "junk before SOI", junk(37) + data
    yield "garbage EXIF", data[:2] + segment(0xE1, b"Exif\x00\x00" + junk(60)) + data[2:]
    yield "EXIF with a bad IFD offset", data[:2] + segment(
        0xE1, b"Exif\x00\x00MM\x00*\x7f\xff\xff\xf0" + bytes(20)) + data[2:]
    yield "bad ICC segment after SOF", data[:sos] + segment(
        0xE2, b"ICC_PROFILE\x00\x05\x02" + junk(80)) + data[sos:]
    yield "broken MPO header", data[:2] + segment(
        0xE2, b"MPF\x00MM\x00*\x00\x00\x00\x08" + junk(40)) + data[2:]
    yield "broken Photoshop segment", data[:2] + segment(
        0xED, b"Photoshop 3.0\x00" + junk(50)) + data[2:]
    yield "comment of junk", data[:2] + segment(0xFE, junk(100)) + data[2:]
    yield "trailing junk after EOI", data + junk(300)


def png_metadata_damage(data: bytes):
    def chunk(kind: bytes, body: bytes, crc_ok: bool = True) -> bytes:
        crc = zlib.crc32(kind + body) ^ (0 if crc_ok else 1)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    idat = data.index(b"IDAT") - 4
    iend = data.rindex(b"IEND") - 4
    yield "text chunk with a bad checksum", data[:idat] + chunk(b"tEXt", b"a\x00b", False) \
        + data[idat:]
    yield "garbage ICC chunk", data[:idat] + chunk(b"iCCP", b"p\x00\x00" + bytes(range(99))) \
        + data[idat:]
    yield "garbage EXIF chunk", data[:idat] + chunk(b"eXIf", b"MM\x00*" + bytes(40)) \
        + data[idat:]
    yield "bad text chunk after the image data", data[:iend] + chunk(b"zTXt", b"k\x00\x00x",
                                                                     False) + data[iend:]
    yield "IEND with a bad checksum", data[:-1] + bytes([data[-1] ^ 1])
    yield "junk after IEND", data + bytes(range(200))


def tiff_metadata_damage(photo: Image.Image):
    data = bytearray(encode(photo, "TIFF", tiffinfo={270: "a description of the photo"}))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == 270:
            struct.pack_into("<I", data, entry + 4, 10_000_000)
    yield "a tag longer than the file", bytes(data)


def other_metadata_damage(data: bytes, fmt: str):
    yield "trailing junk", data + bytes(range(256)) * 2
    if fmt == "WEBP":
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buf, "WEBP", lossless=True, exif=b"Exif\x00\x00junk")
        yield "garbage EXIF chunk", buf.getvalue()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_broken_metadata_keeps_the_pixels_and_says_so(photo, fmt):
    data = encode(photo, fmt)
    original = reference(data)
    damaged = {"JPEG": lambda: jpeg_metadata_damage(data),
               "PNG": lambda: png_metadata_damage(data),
               "TIFF": lambda: tiff_metadata_damage(photo)}.get(
                   fmt, lambda: other_metadata_damage(data, fmt))()
    warned = 0
    for kind, copy in damaged:
        result, out = outcome(copy)
        assert result == "kept", f"{fmt} with {kind} was refused: {out}"
        assert_exact(out, original, f"{fmt} with {kind}")
        warned += out.warning is not None
    if fmt in ("JPEG", "PNG", "TIFF"):  # their decoders complain about these: it is said
        assert warned >= 1


def random_damage(data: bytes, seed: int):
    """A flipped bit and a random 64-byte block at 40 offsets spread over the file."""
    rng = np.random.default_rng(seed)
    for offset in sorted({int(o) for o in np.linspace(0, len(data) - 1, 40)}):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << int(rng.integers(8))
        yield "flip", offset, bytes(flipped)
        block = bytearray(data)
        block[offset:offset + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        yield "block", offset, bytes(block[:len(data)])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_random_damage_is_refused_or_decoded_whole_and_never_escapes(photo, fmt):
    """Any damage ends in a refusal or a whole image, never in an exception. In a PNG,
    whose chunks carry checksums, anything accepted is the original's pixels; the other
    formats carry no check on their coded values (a flipped bit in a JPEG's coefficients
    or a BMP's pixels is another valid image), so there only the shape is checked."""
    data = encode(photo, fmt)
    original = reference(data)
    refused = 0
    for kind, offset, copy in random_damage(data, seed=len(fmt)):
        result, out = outcome(copy)
        if result == "refused":
            refused += 1
            continue
        assert out.image.size == (out.width, out.height)
        if fmt == "PNG" and (out.width, out.height) == photo.size:
            assert_exact(out, original, f"PNG {kind} at {offset}")
    if fmt == "PNG":
        assert refused >= 70, refused


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


def test_a_tiff_without_its_dimensions_is_one_refusal_not_an_exception(photo):
    data = bytearray(encode(photo, "TIFF"))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] in (256, 257):  # width, length
            struct.pack_into("<H", data, entry, 65000)
    with pytest.raises(MediaError, match=r"^corrupt"):
        decode_image(bytes(data), BIG)


def test_a_damaged_photo_is_never_taken_for_the_thumbnail_inside_it(photo):
    thumb = encode(photo.resize((96, 64)), "JPEG")
    exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + bytes(18) + thumb
    data = encode(photo, "JPEG")
    with_thumb = data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + data[2:]
    assert decode_image(with_thumb, BIG).image.size == photo.size
    for damaged in (b"\x00" + with_thumb[1:], b"\x00" + with_thumb[1:len(with_thumb) // 2],
                    b"ID3\x04\x00" + bytes(40) + thumb + bytes(5000)):  # audio with a cover
        with pytest.raises(MediaError):
            decode_image(damaged, BIG)
