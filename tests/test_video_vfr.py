"""Cut times on variable-frame-rate and edit-listed videos, for `scenes` and `transnetv2`,
against oracles of their own: the timestamps written into each video, PySceneDetect's
`scenedetect.detect` and TransNetV2's `predict_frames` on the same decoded frames. Also:
a video that decodes whole is never called truncated, and whatever PyAV or a detector
raises on one video becomes that video's error row."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from curate.media.clips import SplitOptions, frames_at, split
from curate.media.decode import MediaError
from curate.media.video import VideoSource, frames, probe, write_video

SIZE = (160, 90)
CUT_S = 2.0  # the shot change, in the times written


def _shot(name: str, count: int, size: tuple[int, int]):
    """`count` frames of a slow pan over one of scikit-image's photos."""
    import skimage.data

    photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    w, h = photo.size
    cw = int(w * 0.7)
    ch = int(cw * size[1] / size[0])
    for k in range(count):
        t = k / max(count - 1, 1)
        x, y = int(t * (w - cw) * 0.4), int(t * (h - ch) * 0.3)
        crop = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BILINEAR)
        yield np.asarray(crop)


def _vfr_times() -> list[float]:
    """Uneven gaps: 40, 160 and 100 ms in turn before the cut, then 20 ms (50 fps): the
    mean rate says nothing about where a frame is."""
    times, t, gaps = [], 0, [40, 160, 100]
    while t < CUT_S * 1000:
        times.append(t)
        t += gaps[len(times) % 3]
    times += list(range(int(CUT_S * 1000), int(CUT_S * 1000) + 600, 20))
    return [ms / 1000 for ms in times]


def _elst(data: bytes) -> int:
    """Offset of the first entry of the video track's edit list (`elst`, version 0)."""
    def walk(offset: int, end: int) -> int | None:
        while offset < end:
            size, kind = struct.unpack(">I4s", data[offset:offset + 8])
            if kind == b"elst":
                return offset + 16
            if kind in (b"moov", b"trak", b"edts"):
                found = walk(offset + 8, offset + size)
                if found is not None:
                    return found
            offset += size
        return None

    found = walk(0, len(data))
    assert found is not None, "the MP4 has no edit list"
    return found


@pytest.fixture(scope="module")
def vfr_videos(tmp_path_factory):
    """{kind: (path, times of the frames as they play, the first frame of the new shot)}:
    a VFR video; the same written 0.7 s late (an MP4 edit list that delays the start);
    and the VFR video with its first 0.46 s (4 frames) trimmed by its edit list, as an
    editor trims without re-encoding (the demuxer drops the frames before the edit)."""
    import av

    root = tmp_path_factory.mktemp("vfr")
    times = _vfr_times()
    before = sum(t < CUT_S for t in times)
    pixels = [*_shot("astronaut", before, SIZE), *_shot("chelsea", len(times) - before, SIZE)]
    write_video(str(root / "vfr.mp4"), pixels, fps=25, times_s=times)
    write_video(str(root / "delayed.mp4"), pixels, fps=25, times_s=[t + 0.7 for t in times])
    data = bytearray((root / "vfr.mp4").read_bytes())
    entry = _elst(bytes(data))
    # segment length in the movie's units (FFmpeg writes milliseconds), start in the track's
    duration, media_time = struct.unpack(">Ii", data[entry:entry + 8])
    with av.open(str(root / "vfr.mp4")) as container:
        per_second = 1 / container.streams.video[0].time_base
    # the edit starts where a frame starts: which frame shows first is not in doubt
    trim = times[4]
    data[entry:entry + 8] = struct.pack(">Ii", duration - round(trim * 1000),
                                        media_time + round(trim * per_second))
    (root / "trimmed.mp4").write_bytes(bytes(data))
    kept = [round(t - trim, 6) for t in times[4:]]
    return {"vfr": (root / "vfr.mp4", times, before),
            "delayed": (root / "delayed.mp4", times, before),
            "trimmed": (root / "trimmed.mp4", kept, before - (len(times) - len(kept)))}


def _split(path, method: str, **options):
    info = probe(VideoSource(str(path)))
    options = SplitOptions(method=method, min_clip_s=0.5, max_clip_s=None, **options)
    return list(split(VideoSource(str(path)), info.fps, options))


def test_the_hand_made_videos_are_what_they_claim(vfr_videos):
    import av

    for kind, (path, times, _) in vfr_videos.items():
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            start = float(stream.start_time * stream.time_base)
            decoded = [float(f.pts * f.time_base) - start for f in container.decode(stream)]
        assert start == pytest.approx(0.7 if kind == "delayed" else 0.0), kind
        np.testing.assert_allclose(decoded, times, atol=1e-6, err_msg=kind)
        gaps = np.diff(times)
        assert gaps.max() > 5 * gaps.min()  # a variable frame rate indeed
    # the reader hands the same times, frame by frame
    for path, times, _ in vfr_videos.values():
        np.testing.assert_allclose([f.time_s for f in frames(VideoSource(str(path)))], times,
                                   atol=1e-6)


@pytest.mark.parametrize("kind", ["vfr", "delayed", "trimmed"])
def test_scenes_cuts_at_the_frames_own_time(vfr_videos, kind):
    from scenedetect import ContentDetector, detect

    path, times, cut = vfr_videos[kind]
    clips = _split(path, "scenes")
    assert [(c.start_frame, c.end_frame) for c in clips] == [(0, cut), (cut, len(times))]
    assert clips[1].start_s == pytest.approx(times[cut], abs=1e-6)
    assert clips[0].end_s == clips[1].start_s
    assert clips[1].end_s == pytest.approx(times[-1] + 0.02, abs=1e-6)  # the last frame ends
    # PySceneDetect's own reading of the file (its PyAV backend, timestamps included)
    reference = detect(str(path), ContentDetector(min_scene_len=0.25), backend="pyav")
    assert [round(s.seconds, 6) for s, _ in reference] == \
        [round(c.start_s, 6) for c in clips]
    # sampled frames and their times lie inside their clip
    assert all(c.start_s <= t < c.end_s for c in clips for t in c.frame_times)


@pytest.mark.parametrize("kind", ["vfr", "delayed", "trimmed"])
def test_transnetv2_matches_its_reference_inference_on_the_same_frames(vfr_videos, kind):
    import av
    import torch

    from curate.media.clips import transnet_model

    path, times, cut = vfr_videos[kind]
    clips = _split(path, "transnetv2")
    # the reference: the model's own windowing and scene rule on the frames PyAV decodes,
    # scaled to 48x27 as its own video reader does
    with av.open(str(path)) as container:
        small = [f.reformat(width=48, height=27, format="rgb24").to_ndarray()
                 for f in container.decode(video=0)]
    model = transnet_model("cpu")
    single, _ = model.predict_frames(torch.from_numpy(np.stack(small)), quiet=True)
    scenes = model.predictions_to_scenes(single.float().numpy(), threshold=0.5)
    reference_cuts = [int(start) for start, _ in scenes[1:]]
    assert reference_cuts == [cut]  # the model sees the shot change the file has
    assert [c.start_frame for c in clips[1:]] == reference_cuts
    assert [c.start_s for c in clips[1:]] == pytest.approx([times[cut]], abs=1e-6)
    assert clips[-1].end_frame == len(small)


@pytest.fixture(scope="module")
def full_hd(tmp_path_factory):
    """3 s at 10 fps, 1920x1080: a shot of 2.1 s, then one of 0.9 s (under min_clip_s)."""
    path = tmp_path_factory.mktemp("hd") / "hd.mp4"
    write_video(str(path), [*_shot("coffee", 21, (1920, 1080)),
                            *_shot("rocket", 9, (1920, 1080))], fps=10)
    return path


def _rows(path, **params) -> list[dict]:
    from curate.stages import IngestVideos, SplitClips

    ingest = IngestVideos(paths=[str(path)])
    rows, media = ingest.load(ingest.list_inputs())
    return [r for table, _ in SplitClips(**params).expand(rows, media)
            for r in table.to_pylist()]


@pytest.mark.parametrize("method", ["scenes", "transnetv2", "fixed"])
def test_a_video_that_decodes_whole_is_not_called_truncated(full_hd, method):
    rows = _rows(full_hd, method=method, clip_s=2.0)
    assert [r["error"] for r in rows] == [None] * len(rows), rows
    assert rows[0]["media_type"] == "video_clip" and rows[0]["clip_start_s"] == 0.0
    if method != "fixed":  # the short last shot is left out, not called damage
        assert [(r["clip_start_s"], r["clip_end_s"]) for r in rows] == [(0.0, 2.1)]


def test_a_video_cut_off_midway_is_still_truncated(tmp_path):
    import av

    path = tmp_path / "whole.mp4"
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as out:  # index first
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = *SIZE, "yuv420p"
        for pixels in [*_shot("astronaut", 30, SIZE), *_shot("chelsea", 30, SIZE)]:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    for method in ("scenes", "fixed"):
        rows = _rows(tmp_path / "cut.mp4", method=method, clip_s=1.0)
        assert rows[-1]["media_type"] == "video"
        assert rows[-1]["error"].startswith("truncated: "), rows[-1]["error"]
        assert " of 60 frames decode (" in rows[-1]["error"]


class _Broken:
    """A PyAV container whose decoder raises a plain Python error after two frames."""

    def __init__(self, container):
        self._container = container

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for k, frame in enumerate(self._container.decode(*args, **kwargs)):
            if k == 2:
                raise ValueError("invalid frame side data")
            yield frame


def test_whatever_pyav_or_transnetv2_raises_becomes_the_rows_error(vfr_videos, monkeypatch):
    import av

    import curate.media.clips

    path = vfr_videos["vfr"][0]
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: _Broken(real_open(*a, **k)))
    for method in ("scenes", "fixed"):
        # probe reads one frame: it passes; split decodes on and meets the error
        rows = _rows(path, method=method)
        assert [r["media_type"] for r in rows] == ["video"]
        assert rows[0]["error"].startswith("undecodable: decoding stopped at frame 2 "), rows
        assert "invalid frame side data" in rows[0]["error"]
    monkeypatch.setattr(av, "open", real_open)

    class Failing:
        device = "cpu"

        def predict_raw(self, batch):
            raise RuntimeError("CUDA error: out of memory\nmore lines")

    monkeypatch.setattr(curate.media.clips, "transnet_model", lambda device="cpu": Failing())
    rows = _rows(path, method="transnetv2")
    assert [r["media_type"] for r in rows] == ["video"]
    assert rows[0]["error"] == ("detection_failed: TransNetV2 failed at the end of the "
                                "video: RuntimeError: CUDA error: out of memory")


def test_fixed_windows_skip_a_jump_in_the_timestamps_and_match_a_plain_reference():
    """Windows by frame times: the same spans as opening every window in turn (a plain
    reference), and a damaged timestamp far ahead costs no window per stride."""
    from curate.media.clips import _FixedSpans

    def reference(times, clip_s, stride_s):
        spans, k = [], 0
        while k * stride_s <= times[-1]:
            start, end = k * stride_s, k * stride_s + clip_s
            inside = [i for i, t in enumerate(times) if start - 1e-9 <= t < end - 1e-9]
            if inside:
                after = next((i for i, t in enumerate(times) if t >= end - 1e-9), None)
                spans.append((inside[0], after if after is not None else len(times)))
            k += 1
        return spans

    rng = np.random.default_rng(3)
    times = np.cumsum(rng.choice([0.02, 0.1, 0.7, 3.1], size=200)).round(3).tolist()
    for clip_s, stride_s in ((2.0, None), (2.0, 0.5), (1.0, 3.0)):
        windows = _FixedSpans(SplitOptions(method="fixed", clip_s=clip_s, stride_s=stride_s))
        got = [s for i, t in enumerate(times) for s in windows.push(i, t)]
        got += windows.finish(len(times))
        assert sorted(got) == reference(times, clip_s, stride_s or clip_s)
    windows = _FixedSpans(SplitOptions(method="fixed", clip_s=2.0))
    assert windows.push(0, 0.0) == [] and windows.push(1, 1e12) == [(0, 1)]
    assert windows.finish(2) == [(1, 2)]


@pytest.mark.parametrize("kind", ["vfr", "delayed", "trimmed"])
def test_a_clips_frames_decoded_again_from_its_span_are_those_split_handed_on(vfr_videos,
                                                                              kind):
    """A later run decodes a stored clip's frames again from its span and frame_times:
    the same pixels `split` handed on, on VFR and edit-listed videos too."""

    path = vfr_videos[kind][0]
    clips = _split(path, "fixed", clip_s=0.5, frames_per_clip=3, frame_max_side=128)
    assert len(clips) >= 3 and sum(len(c.frames) for c in clips) > len(clips)
    for clip in clips:
        again = frames_at(VideoSource(str(path)), clip.start_s, clip.frame_times, 128)
        assert [np.asarray(a).tobytes() for a in again] == \
            [np.asarray(f).tobytes() for f in clip.frames], clip
    with pytest.raises(MediaError, match="changed"):  # a time no frame has
        frames_at(VideoSource(str(path)), clips[1].start_s, [clips[1].start_s + 0.001], 128)
