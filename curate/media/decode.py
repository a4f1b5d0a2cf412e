"""Safe reading and decoding of images: limits enforced, failures returned as values.

Every failure is a `MediaError` whose text starts with a short code (`empty`, `truncated`,
`not_an_image`, `too_large`, ...) followed by the detail, so reports can group by code.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
import time
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Decoding must never silently accept a cut-off file.
ImageFile.LOAD_TRUNCATED_IMAGES = False

#: Errors worth retrying on a later run (the file may be fine next time; a worker short of
#: memory says nothing about the file).
#: `changed`: a file whose bytes differ from those its row was made from (found when a
#: stage reads a stored row again): the next run reads its input again whole.
#: `unreachable`, `denied`: an object store that failed (after retries) or refused (keys
#: that expired midway) may answer next time.
TRANSIENT_CODES = ("http_timeout", "http_error", "out_of_memory", "changed", "unreachable",
                   "denied", "unavailable")


def is_out_of_memory(exc: BaseException) -> bool:
    """A MemoryError, or a GPU library's out-of-memory error (torch.OutOfMemoryError)."""
    return isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
#: EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


class MediaError(Exception):
    """A file that cannot be used; str() is `<code>: <detail>`."""

    def __init__(self, code: str, detail: str):
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


class Window(io.RawIOBase):
    """A read-only, seekable file over `size` bytes from `offset` of something larger (a
    tar member, an object read by ranges): subclasses say how to read at an offset."""

    def __init__(self, offset: int, size: int):
        super().__init__()
        self._offset, self._size, self._pos = offset, size, 0

    def _read_at(self, offset: int, size: int):
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = min(max(base + pos, 0), self._size)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        data = self._read_at(self._offset + self._pos, want)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def error_code(message: str | None) -> str | None:
    """The code at the start of an error or verdict text (`blur 3.1 < 40` -> `blur`)."""
    if not message:
        return None
    head = message.split(":", 1)[0].split(" ", 1)[0]
    return head.strip() or message


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# --- reading bytes ------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpOptions:
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5
    user_agent: str = "curate"


def file_size(path: str) -> int:
    """The size of a local file; MediaError `missing` or `unreadable` when it cannot be
    seen."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise MediaError("missing", f"{path} does not exist") from None
    except OSError as exc:
        raise MediaError("unreadable", f"{path}: {exc.strerror or exc}") from None


def read_local(path: str, max_bytes: int) -> bytes:
    size = file_size(path)
    if size > max_bytes:
        raise MediaError("too_large", f"{_mb(size)} > max_bytes {_mb(max_bytes)}")
    try:
        with open(path, "rb") as fh:
            return fh.read(max_bytes + 1)
    except IsADirectoryError:
        raise MediaError("unreadable", f"{path} is a directory") from None
    except OSError as exc:
        raise MediaError("unreadable", f"{path}: {exc.strerror or exc}") from None


def read_tar_member(tar_path: str, member: str, offset: int, size: int, max_bytes: int) -> bytes:
    """Bytes of one tar member, located by the offset found when the shard was listed."""
    if size > max_bytes:
        raise MediaError("too_large", f"{_mb(size)} > max_bytes {_mb(max_bytes)}")
    try:
        with open(tar_path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
    except OSError as exc:
        raise MediaError("unreadable", f"{tar_path}: {exc.strerror or exc}") from None
    if len(data) != size:
        raise MediaError("truncated", f"tar member {member} ends early ({len(data)}/{size} bytes)")
    return data


def read_http(url: str, max_bytes: int, options: HttpOptions) -> bytes:
    """GET a URL with a timeout, retries with backoff on transient failures, and a size cap."""
    last: MediaError | None = None
    for attempt in range(options.retries + 1):
        if attempt:
            time.sleep(options.backoff_s * 2 ** (attempt - 1))
        request = urllib.request.Request(url, headers={"User-Agent": options.user_agent})
        try:
            with urllib.request.urlopen(request, timeout=options.timeout_s) as resp:
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise MediaError(
                        "too_large", f"{_mb(int(declared))} > max_bytes {_mb(max_bytes)}"
                    )
                data = resp.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise MediaError("too_large", f"more than max_bytes {_mb(max_bytes)}")
                return data
        except MediaError:
            raise
        except urllib.error.HTTPError as exc:
            last = MediaError("http_error", f"HTTP {exc.code} {exc.reason} for {url}")
            if exc.code < 500 and exc.code != 429:
                raise MediaError("http_status", f"HTTP {exc.code} {exc.reason} for {url}") from None
        except TimeoutError:
            last = MediaError("http_timeout", f"no answer within {options.timeout_s:g} s: {url}")
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                last = MediaError(
                    "http_timeout", f"no answer within {options.timeout_s:g} s: {url}"
                )
            else:
                last = MediaError("http_error", f"{reason} for {url}")
    assert last is not None
    raise MediaError(last.code, f"{last.detail} (after {options.retries + 1} attempts)")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- decoding ------------------------------------------------------------------------------


@dataclass
class DecodedImage:
    """An image normalised for analysis, and what was learnt about the original."""

    image: Image.Image  # RGB, EXIF-oriented, longest side <= max_side when one was given
    width: int  # of the original, as displayed (after EXIF orientation)
    height: int
    format: str  # sniffed from the content, not the file name
    num_frames: int
    #: What was odd about a file whose pixels all decoded (junk before a marker, a bad
    #: metadata block, a missing end marker), or None for a clean file.
    warning: str | None = None


#: A JPEG with more scans than this is refused before its pixels are decoded: each scan
#: is a pass over the whole image, so scans bound a progressive JPEG's decode time.
MAX_JPEG_SCANS = 1000


def decode_image(data: bytes, max_pixels: int, max_side: int | None = None) -> DecodedImage:
    """Decode bytes into an RGB image, or raise MediaError saying why not.

    The format is sniffed from the content; EXIF orientation is applied; the first frame
    of animated or multi-page files is used; any mode becomes RGB; images of more than
    `max_pixels` are refused before their pixels are decoded (decompression bombs).
    `max_side` bounds the returned copy (JPEGs are decoded at reduced scale when possible).

    Damage to pixels is refused (truncation, corrupt coded data, a failed checksum on
    image data); damage to metadata is not (junk before a marker, a bad EXIF, ICC, MPO or
    text block, a missing end marker after complete image data): the file decodes and
    `warning` says what was odd. This is the one place where an input's bytes become
    pixels, so whatever a decoder raises becomes a MediaError here.
    """
    if not data:
        raise MediaError("empty", "file has 0 bytes")
    try:
        try:
            return _decode(data, max_pixels, max_side)
        except MediaError as exc:
            if exc.code not in _REPAIRABLE:
                raise
            for repaired, notes in _repairs(data):
                try:
                    out = _decode(repaired, max_pixels, max_side)
                except MediaError:
                    continue
                out.warning = _join(notes + ([out.warning] if out.warning else []))
                return out
            raise
    except MediaError:
        raise
    except MemoryError:
        raise MediaError("out_of_memory", "the worker ran out of memory while decoding; "
                         "the next run reads it again") from None
    except Exception as exc:  # any decoder failure on these bytes is the file's fault
        raise MediaError("corrupt", f"the decoder failed: {type(exc).__name__}: {exc}") from None


_REPAIRABLE = ("corrupt", "truncated", "not_an_image")


def _decode(data: bytes, max_pixels: int, max_side: int | None) -> DecodedImage:
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            looks_like = _magic_format(data)
            if looks_like:
                raise MediaError("corrupt", f"starts like a {looks_like} file but its header "
                                 "cannot be read") from None
            raise MediaError("not_an_image", "content is not a recognised image format") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise MediaError("too_large", f"decompression bomb refused: {exc}") from None
        except MemoryError:
            raise  # the worker's, not the file's: decode_image says so
        except Exception as exc:  # any decoder failure here is the file's fault
            raise MediaError("corrupt", f"cannot open: {exc}") from None
        fmt = img.format or "unknown"
        width, height = img.size
        if width <= 0 or height <= 0:
            raise MediaError("corrupt", f"invalid size {width}x{height}")
        if width * height > max_pixels:
            raise MediaError(
                "too_large", f"{width}x{height} = {width * height:,} pixels > max_pixels "
                f"{max_pixels:,}"
            )
        # The pixels load before anything else reads the file: PIL reads a PNG's EXIF
        # after its image data, and a decoder error met there would otherwise be lost.
        try:
            pixels = _load_pixels(img, data, max_side)
        except (MediaError, MemoryError):
            raise
        except OSError as exc:
            text = str(exc)
            code = "truncated" if "truncated" in text or "broken data" in text else "corrupt"
            raise MediaError(code, f"cannot decode {fmt}: {text}") from None
        except Exception as exc:  # any decoder failure here is the file's fault
            raise MediaError("corrupt", f"cannot decode {fmt}: {exc}") from None
        if fmt == "PNG":  # PIL does not check the checksums of image data
            _check_png_chunks(data)
        try:  # frames past the first and EXIF are metadata: their damage is a warning
            num_frames = int(getattr(img, "n_frames", 1) or 1)
        except Exception as exc:
            num_frames = 1
            notes.append(f"frame count unreadable ({exc})")
        try:
            orientation = img.getexif().get(_ORIENTATION_TAG)
        except Exception as exc:
            orientation = None
            notes.append(f"EXIF unreadable, orientation not applied ({exc})")
    for caught_warning in caught:
        if f"{os.sep}PIL{os.sep}" in caught_warning.filename:
            # PIL warns on metadata it skips (a tag past the end, a bad EXIF block) and
            # raises on missing image data; the pixels have loaded whole by now
            notes.append(f"{fmt} decoder warned: {caught_warning.message}")
        else:
            warnings.warn_explicit(caught_warning.message, caught_warning.category,
                                   caught_warning.filename, caught_warning.lineno)
    img = pixels
    if orientation in _SWAPS_AXES:
        width, height = height, width
    if orientation in _ORIENT:
        img = img.transpose(_ORIENT[orientation])
    rgb = to_rgb(img)
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return DecodedImage(rgb, width, height, fmt, num_frames, _join(notes))


def _join(notes: list[str]) -> str | None:
    """Notes once each, in order, at most 1,000 characters in all."""
    text = "; ".join(dict.fromkeys(notes))
    return (text[:997] + "...") if len(text) > 1000 else (text or None)


def _load_pixels(img: Image.Image, data: bytes, max_side: int | None) -> Image.Image:
    """The decoded pixels of an opened image (JPEGs at reduced scale under `max_side`).

    PIL ignores libjpeg's warnings (a bad Huffman code, bytes before a marker: the rest of
    the image comes out grey or garbled), so JPEGs are decoded by libjpeg-turbo through
    simplejpeg in strict mode, where those warnings are errors; the same library PIL uses,
    so the pixels are the same. CMYK/YCCK files, which it cannot convert, are decoded by
    PIL and checked by a strict 1/8-scale pass that still reads every coefficient. A
    warning about the file's structure rather than its coded data is undone by a repair
    (`_repairs`) that rebuilds the file without what was odd and decodes it again.
    """
    if img.format not in ("JPEG", "MPO"):
        img.load()
        return img
    import simplejpeg

    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise MediaError("too_large", f"{scans} scans > {MAX_JPEG_SCANS} (each one is a pass "
                         "over the whole image)")
    width, height = img.size
    factor = 1
    if max_side:  # the scale PIL's draft() picks: the image stays >= max_side both ways
        fit = min(width // max_side, height // max_side)
        factor = next(f for f in (8, 4, 2, 1) if f <= max(fit, 1))
    try:
        if img.mode in ("RGB", "L"):
            pixels = simplejpeg.decode_jpeg(
                data, colorspace="RGB" if img.mode == "RGB" else "GRAY",
                min_width=-(-width // factor), min_height=-(-height // factor), strict=True)
            return Image.fromarray(pixels[..., 0] if img.mode == "L" else pixels, img.mode)
        simplejpeg.decode_jpeg(data, colorspace="CMYK", min_width=1, min_height=1,
                               min_factor=8, strict=True)
    except ValueError as exc:
        text = str(exc)
        code = "truncated" if "Premature end" in text else "corrupt"
        raise MediaError(code, f"cannot decode JPEG: {text}") from None
    if max_side:
        img.draft(img.mode, (max_side, max_side))
    img.load()
    return img


# --- repairs: files whose structure, not their coded pixels, is odd ---------------------

_SOI = b"\xff\xd8\xff"
#: JPEG segments a decoder needs for the pixels: the rest (EXIF, ICC, MPO, XMP, Photoshop,
#: comments) is metadata, dropped by the second repair when the first did not do.
_JPEG_PIXEL_MARKERS = {0xC4, 0xCC, 0xDB, 0xDD, 0xE0, 0xEE} | set(range(0xC0, 0xD0))
#: PNG chunks whose damage changes the pixels (tRNS: transparency is composited)
_PNG_PIXEL_CHUNKS = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS"}


def _repairs(data: bytes):
    """Rebuilt copies of a JPEG or PNG without its structural oddities, each with notes
    that say what was odd, mildest first. The coded image data is copied untouched: a
    copy decodes only if every pixel was there to decode."""
    start = _jpeg_start(data)
    if start >= 0:
        notes = [f"{start} bytes of junk before the JPEG's start"] if start else []
        for drop_metadata in (False, True):
            repaired = _rebuild_jpeg(data, start, drop_metadata)
            if repaired is not None and (notes or repaired[1]):
                yield repaired[0], notes + repaired[1]
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        repaired = _rebuild_png(data)
        if repaired is not None:
            yield repaired


#: The most junk taken for junk before a JPEG's start, and after its end marker when there
#: was junk before it.
MAX_JUNK = 1024


def _jpeg_start(data: bytes) -> int:
    """Where the file's JPEG starts, or -1. Junk before the start is accepted only when the
    JPEG found after it runs to the file's end: a JPEG further in that something else
    follows is an embedded one (an EXIF thumbnail of a damaged photo, an audio file's
    cover), never the file's own image."""
    if data.startswith(b"\xff\xd8"):
        return 0
    start = data.find(_SOI, 0, MAX_JUNK + len(_SOI))
    if start < 0:
        return -1
    scan = data.find(b"\xff\xda", start)
    end = data.find(b"\xff\xd9", scan) if scan >= 0 else -1
    return start if end >= 0 and len(data) - (end + 2) <= MAX_JUNK else -1


def _rebuild_jpeg(data: bytes, start: int, drop_metadata: bool):
    """The JPEG from `start` with junk between its header segments removed, metadata
    segments dropped (when asked), and an end marker after its coded data if it had none."""
    out, notes, pos, n = [b"\xff\xd8"], [], start + 2, len(data)
    while True:
        junk_at = pos
        while (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < n \
                and data[pos + 1] in (0x00, 0xFF):
            pos += 1  # not a marker: 0xFF 0x00 is junk here, a run of 0xFF is fill
        if pos < 0 or pos + 1 >= n:
            return None  # no scan: nothing to decode
        junk = pos - junk_at - data.count(b"\xff", junk_at, pos)  # 0xFF runs: legal fill
        marker = data[pos + 1]
        if junk:
            notes.append(f"{junk} bytes of junk before marker 0x{marker:02x} at byte {junk_at}")
        if marker == 0xDA:  # start of scan: the coded data and what follows, as they are
            tail = data[pos:]
            out.append(tail)
            if b"\xff\xd9" not in tail:
                out.append(b"\xff\xd9")
                notes.append("no end-of-image marker after the coded data")
            break
        if marker == 0xD9 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        if pos + 4 > n:
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos:pos + 2 + length]
        pos += 2 + length
        if drop_metadata and marker not in _JPEG_PIXEL_MARKERS:
            notes.append(f"metadata segment 0x{marker:02x} ({len(segment)} bytes) unreadable, "
                         "left out")
            continue
        out.append(segment)
    return b"".join(out), notes


def _png_chunks(data: bytes):
    """(offset, kind, end of body, checksum ok) of a PNG's chunks up to IEND; a chunk cut
    off by the end of the file comes last, with None for its checksum."""
    pos, n = 8, len(data)
    while pos + 12 <= n:
        (length,) = struct.unpack_from(">I", data, pos)
        kind, end = data[pos + 4:pos + 8], pos + 8 + length
        if end + 4 > n:
            yield pos, kind, end, None
            return
        (crc,) = struct.unpack_from(">I", data, end)
        yield pos, kind, end, zlib.crc32(memoryview(data)[pos + 4:end]) == crc
        if kind == b"IEND":
            return
        pos = end + 4


_IEND = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def _rebuild_png(data: bytes):
    """The PNG without ancillary chunks that fail their checksum, and with an IEND after
    complete image data when the file ends early; None when image data is damaged."""
    out, notes = [data[:8]], []
    inflate = zlib.decompressobj()
    for pos, kind, end, checksum_ok in _png_chunks(data):
        if kind == b"IEND":
            if not checksum_ok:
                notes.append(f"PNG end chunk at byte {pos} is damaged")
            return (b"".join([*out, _IEND]), notes) if notes else None
        if not checksum_ok and kind in _PNG_PIXEL_CHUNKS:
            return None
        if checksum_ok is None:
            break  # an ancillary chunk cut off by the end of the file
        if kind == b"IDAT":
            try:  # inflated in steps, the output dropped: only completeness matters
                pending = data[pos + 8:end]
                while pending and not inflate.eof:
                    inflate.decompress(pending, 1 << 20)
                    pending = inflate.unconsumed_tail
            except zlib.error:
                return None
        if checksum_ok:
            out.append(data[pos:end + 4])
        else:
            notes.append(f"PNG chunk {kind!r} at byte {pos} fails its checksum, left out")
    if not inflate.eof:
        return None
    notes.append(f"the PNG ends at byte {len(data)} without its end chunk, after complete "
                 "image data")
    return b"".join([*out, _IEND]), notes


def _check_png_chunks(data: bytes) -> None:
    last = None
    for pos, kind, _, checksum_ok in _png_chunks(data):
        if checksum_ok is None:
            raise MediaError("truncated", f"PNG chunk {kind!r} at byte {pos} is cut off")
        if not checksum_ok:
            raise MediaError("corrupt", f"PNG chunk {kind!r} at byte {pos} fails its checksum")
        last = kind
    if last != b"IEND":
        raise MediaError("truncated", "PNG ends before its IEND chunk")


_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)


def _magic_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def luma(img: Image.Image) -> Image.Image:
    """The image's luma (mode L), converted once per image object: the pixel stages of a
    pool (quality scores, the perceptual hash) all read it."""
    cached = getattr(img, "_curate_luma", None)
    if cached is None:
        cached = img.convert("L")
        img._curate_luma = cached  # PIL images take attributes; gone with the image
    return cached


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited over white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if mode == "F" and top <= 1.0:
            arr = arr * 255.0
        elif top > 255:
            # 16-bit data (PNG, TIFF) arrives as I;16 or I: scale 0..65535 to 0..255.
            arr = arr / 257.0
        gray = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise MediaError("unsupported_mode", f"cannot convert mode {mode} to RGB: {exc}") from None


def list_tar(shard) -> list[tarfile.TarInfo]:
    """Regular-file members of an uncompressed tar shard (a path, or a seekable file:
    an object read by ranges), with their data offsets."""
    given = {"name": shard} if isinstance(shard, str) else {"fileobj": shard}
    with tarfile.open(mode="r:", **given) as tar:
        return [m for m in tar.getmembers() if m.isfile()]
