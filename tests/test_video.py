"""Video: probing, shot detection, frame sampling and motion, broken files, bounded memory,
closed containers, clip scores and captions, and whole runs (resumed after kill -9)."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import lancedb
import numpy as np
import pyarrow as pa
import pytest
import yaml

from curate import Pipeline, load_config
from curate.media.clips import Clip, SplitOptions, split
from curate.media.decode import MediaError
from curate.media.video import VideoSource, probe, write_video

from .conftest import ROOT, tiny_models

BROKEN = ROOT / "examples" / "videos" / "broken"
SHOTS = [2.0, 3.0, 1.5, 2.5, 3.0]  # seconds; 24 fps
FPS = 24


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory):
    """A 12 s video of five shots (pans over different photos) and its true cuts."""
    from curate.media.samples import write_video_with_cuts

    path = tmp_path_factory.mktemp("cuts") / "cuts.mp4"
    cuts = write_video_with_cuts(path, SHOTS, (640, 360), fps=FPS, seed=4)
    return path, cuts


def _clips(path, **options) -> list[Clip]:
    info = probe(VideoSource(str(path)))
    return list(split(VideoSource(str(path)), info.fps, SplitOptions(**options)))


def test_probe_reads_the_stream_facts(cut_video):
    info = probe(VideoSource(str(cut_video[0])))
    assert (info.width, info.height, info.codec, info.has_audio) == (640, 360, "h264", False)
    assert info.fps == FPS
    assert info.num_frames == round(sum(SHOTS) * FPS)
    assert abs(info.duration_s - sum(SHOTS)) < 0.1


@pytest.mark.parametrize("method,detector", [("scenes", "content"), ("scenes", "adaptive"),
                                             ("transnetv2", "content")])
def test_cuts_are_found_within_two_frames(cut_video, method, detector):
    path, cuts = cut_video
    clips = _clips(path, method=method, detector=detector, min_clip_s=0.5, max_clip_s=None)
    found = [c.start_frame for c in clips[1:]]
    assert len(found) == len(cuts), (found, cuts)
    assert all(abs(f - c) <= 2 for f, c in zip(found, cuts)), (found, cuts)
    # clips tile the video, in order, each with its sampled frames
    assert clips[0].start_frame == 0 and clips[-1].end_frame == round(sum(SHOTS) * FPS)
    assert all(a.end_frame == b.start_frame for a, b in itertools.pairwise(clips))
    assert all(len(c.frames) == 3 and c.frames[0].size == (512, 288) for c in clips)
    assert all(c.start_frame <= t * FPS < c.end_frame for c in clips for t in c.frame_times)


def test_fixed_stride_is_exact(cut_video):
    clips = _clips(cut_video[0], method="fixed", clip_s=2.0, stride_s=1.5, min_clip_s=1.0)
    total = round(sum(SHOTS) * FPS)
    expected = [(s, min(s + 48, total)) for s in range(0, total, 36) if total - s >= 24]
    assert [(c.start_frame, c.end_frame) for c in clips] == expected
    assert [c.index for c in clips] == list(range(len(expected)))
    assert clips[1].start_s == pytest.approx(1.5) and clips[1].end_s == pytest.approx(3.5)


def test_long_shots_are_cut_into_pieces_and_short_ones_left_out(cut_video):
    clips = _clips(cut_video[0], method="scenes", min_clip_s=1.8, max_clip_s=2.0)
    lengths = [c.num_frames for c in clips]
    assert max(lengths) <= 48 and min(lengths) >= 1.8 * FPS
    # shots of 2, 3, 1.5, 2.5 and 3 s: the 1.5 s one is gone, the others became one 2 s
    # piece each (the rests, 0.5 to 1 s, are too short)
    assert lengths == [48] * 4
    assert [c.start_frame for c in clips] == [0, 48, 156, 216]


def test_motion_tells_a_slideshow_from_a_pan(tmp_path):
    from curate.media.samples import write_video_with_cuts

    write_video_with_cuts(tmp_path / "still.mp4", [2.0], (320, 180), fps=FPS, still=True)
    write_video_with_cuts(tmp_path / "pan.mp4", [2.0], (320, 180), fps=FPS)
    still = _clips(tmp_path / "still.mp4", method="fixed", clip_s=2.0)[0].motion
    pan = _clips(tmp_path / "pan.mp4", method="fixed", clip_s=2.0)[0].motion
    assert still < 0.1 < 1.0 < pan


def _codes(stage_params: dict, paths) -> dict[str, str | None]:
    from curate.stages.video.ingest_videos import IngestVideos

    stage = IngestVideos(paths=[str(p) for p in paths], **stage_params)
    rows, media = stage.load(stage.list_inputs())
    out = {}
    for row, item in zip(rows.to_pylist(), media):
        error = row["error"]
        out[os.path.basename(row["uri"])] = error.split(":")[0] if error else None
        assert (item is None) == bool(error)
        assert row["media_type"] == "video"
    return out


def test_every_broken_kind_is_one_row_with_its_reason(tmp_path, cut_video):
    shutil.copy(cut_video[0], tmp_path / "fine.mp4")
    data = (tmp_path / "fine.mp4").read_bytes()
    (tmp_path / "garbage.mkv").write_bytes(np.random.default_rng(0).bytes(4096))
    codes = _codes({}, [BROKEN, tmp_path])
    assert codes == {"empty.mp4": "empty", "notes.mp4": "not_a_video",
                     "one_frame.mp4": None, "tone.m4a": "no_video_stream",
                     "truncated.mp4": "truncated", "fine.mp4": None,
                     "garbage.mkv": "not_a_video"}
    assert _codes({"max_duration_s": 5}, [tmp_path / "fine.mp4"]) == {"fine.mp4": "too_long"}
    assert _codes({"max_bytes": len(data) - 1}, [tmp_path / "fine.mp4"]) == \
        {"fine.mp4": "too_large"}


def test_videos_from_a_manifest_of_urls_are_fetched_and_probed(tmp_path, cut_video):
    import functools
    import http.server
    import json
    import threading

    shutil.copy(cut_video[0], tmp_path / "cuts.mp4")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    manifest = tmp_path / "videos.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"uri": f"{base}/cuts.mp4", "caption": "five shots"},
        {"uri": f"{base}/gone.mp4", "caption": "not there"}]))
    try:
        from curate.stages import IngestVideos, SplitClips

        stage = IngestVideos(paths=[str(manifest)], http_retries=0)
        rows, media = stage.load(stage.list_inputs())
    finally:
        server.shutdown()
    fetched, gone = rows.to_pylist()
    assert fetched["error"] is None and fetched["alt_text"] == "five shots"
    assert fetched["num_frames"] == round(sum(SHOTS) * FPS)
    assert gone["error"].startswith("http_status: HTTP 404")
    blocks = list(SplitClips(method="scenes").expand(rows, media))
    clips = [r for t, _ in blocks for r in t.to_pylist() if r["media_type"] == "video_clip"]
    assert len(clips) == len(SHOTS)  # cut from the bytes held in memory


def test_a_video_damaged_midway_keeps_its_clips_and_says_where(tmp_path, cut_video):
    from curate.stages import IngestVideos, SplitClips

    data = bytearray(cut_video[0].read_bytes())
    # a faststart-free MP4 keeps its index at the end: cut the media data, keep the index
    damaged = tmp_path / "damaged.mp4"
    start = len(data) // 2
    data[start:start + len(data) // 4] = bytes(len(data) // 4)
    damaged.write_bytes(bytes(data))
    ingest = IngestVideos(paths=[str(damaged)])
    rows, media = ingest.load(ingest.list_inputs())
    out = [b for b in SplitClips(method="fixed", clip_s=2.0).expand(rows, media)]
    table = pa.concat_tables([t for t, _ in out]).to_pylist()
    # decoding breaks at the zeroed bytes: the whole clips before them are kept, the video
    # row says where it broke, and the last row counts them all (a resume can tell)
    assert [r["media_type"] for r in table] == ["video_clip"] * 3 + ["video"]
    assert [r["clip_index"] for r in table[:3]] == [0, 1, 2]
    assert table[-1]["error"].startswith("undecodable: decoding stopped at frame ")
    assert table[-1]["error"].endswith("(the 3 clips before it are kept)")
    assert [r["input_rows"] for r in table] == [2, 3, 4, 4]


def test_containers_are_closed_on_every_path(cut_video):
    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_files()
    for _ in range(5):
        _clips(cut_video[0], method="fixed", clip_s=2.0)
        abandoned = split(VideoSource(str(cut_video[0])), FPS, SplitOptions(method="scenes"))
        next(abandoned)
        abandoned.close()  # a consumer that stops early
        for broken in ("truncated.mp4", "notes.mp4", "empty.mp4"):
            with pytest.raises(MediaError):
                probe(VideoSource(str(BROKEN / broken)))
    assert open_files() == before


def test_splitting_memory_does_not_grow_with_the_video_length(tmp_path):
    """Peak RSS of splitting a 20 s and a 160 s video (8x), each in a fresh process."""

    def moving(seconds: int):
        from PIL import Image

        rng = np.random.default_rng(0)
        blobs = Image.fromarray(rng.integers(0, 255, (18, 64, 3), np.uint8))
        texture = np.asarray(blobs.resize((1280, 360), Image.Resampling.BICUBIC))
        for k in range(seconds * FPS):
            x = round(320 + 100 * np.sin(2 * np.pi * k / (20 * FPS)))  # a slow sway
            yield texture[:, x:x + 640]

    script = textwrap.dedent("""
        import resource, sys
        from curate.media.clips import SplitOptions, split
        from curate.media.video import VideoSource, probe
        src = VideoSource(sys.argv[1]); info = probe(src)
        clips = 0
        for clip in split(src, info.fps, SplitOptions(method="scenes", max_clip_s=None)):
            clips += 1
        print(clips, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    peaks = {}
    for seconds in (20, 160):
        path = tmp_path / f"v{seconds}.mp4"
        write_video(str(path), moving(seconds), fps=FPS, crf=35)
        out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout.split()
        peaks[seconds] = int(out[1]) / 1024  # MB
        assert int(out[0]) == 1  # one shot, never cut: the worst case for holding frames
    assert peaks[160] < peaks[20] * 1.15 + 10, peaks


def test_frame_columns_reduce_per_clip():
    from curate import frames
    from curate.algos.vectors import from_matrix, to_matrix
    from curate.stages.image.aesthetic_score import AestheticScore
    from curate.stages.image.image_quality import ImageQuality

    counts = np.array([3, 0, 1])
    quality = ImageQuality(min_blur=10)
    rows = pa.table({"width": [640, None, 640], "height": [360, None, 360],
                     "num_bytes": [1000, None, 1000]})
    per_frame = {"blur": pa.array([4.0, 30.0, 20.0, 8.0], pa.float32()),
                 "brightness": pa.array([1.0, 2.0, 3.0, 4.0], pa.float32()),
                 "contrast": pa.array([1.0] * 4, pa.float32()),
                 "saturation": pa.array([1.0] * 4, pa.float32()),
                 "aspect_ratio": pa.array([1.5] * 4, pa.float32()),
                 "quality_reason": pa.array(["blur 4 < 10", None, None, "blur 8 < 10"])}
    out = frames.reduce(quality, rows, per_frame, counts)
    assert out["blur"].to_pylist() == [18.0, None, 8.0]  # mean by default
    # the verdict follows the reduced score: the clip's mean blur 18 passes
    assert out["quality_reason"].to_pylist() == [None, None, "blur 8 < 10"]
    strict = ImageQuality(min_blur=10, reduction="min")
    assert frames.reduce(strict, rows, per_frame, counts)["quality_reason"].to_pylist()[0] \
        == "blur 4 < 10"
    aesthetic = AestheticScore(weights="w", sha256="0" * 64, min_score=5)
    scores = {"aesthetic_score": pa.array([6.0, 4.0, 7.0, 2.0], pa.float32()),
              "aesthetic_reason": pa.array([None, "x", None, "y"])}
    reduced = frames.reduce(aesthetic, rows, scores, counts)
    assert reduced["aesthetic_score"].to_pylist() == [4.0, None, 2.0]  # min by default
    assert reduced["aesthetic_reason"].to_pylist() == ["aesthetic 4 < 5", None,
                                                        "aesthetic 2 < 5"]
    vectors = from_matrix(np.array([[1, 0], [0, 1], [1, 1], [3, 4]], np.float32))
    mean = frames.reduce(quality, rows, {"clip_embedding": vectors}, counts)["clip_embedding"]
    matrix, valid = to_matrix(mean)
    assert valid.tolist() == [True, False, True]
    np.testing.assert_allclose(matrix[0], [2 / np.sqrt(8), 2 / np.sqrt(8)], rtol=1e-6)
    np.testing.assert_allclose(matrix[2], [0.6, 0.8], rtol=1e-6)
    hashes = frames.reduce(quality, rows, {"phash": pa.array([1, 2, 3, 9], pa.uint64())},
                           counts)["phash"]
    assert hashes.to_pylist() == [2, None, 9]  # the key frame: the middle one


def test_clip_captions_see_every_frame_through_the_tiny_vlm(cut_video):
    from curate.stages.image.caption import Caption

    clips = _clips(cut_video[0], method="scenes", frames_per_clip=3)[:2]
    stage = Caption(model=str(tiny_models() / "tiny-llava"), max_new_tokens=6)
    rows = pa.table({"alt_text": ["a pan", None]})
    prepared = stage.prepare(rows, clips)
    assert prepared.type == pa.list_(pa.binary())
    assert [len(p) for p in prepared.to_pylist()] == [3, 3]
    batch = rows.append_column(stage.prepared_column, prepared)
    chat = stage.conversations(batch, [0, 1])
    assert [part["type"] for part in chat[0][0]["content"]] == ["image"] * 3 + ["text"]
    stage.setup()
    out = stage.process(batch, None)
    captions = out["caption"].to_pylist()
    assert out["caption_error"].to_pylist() == [None, None], out["caption_error"]
    assert all(isinstance(c, str) and c for c in captions)


# --- whole runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_corpus(tmp_path_factory, cut_video):
    """A cut video, an exact copy, a slideshow, a WebDataset shard and the broken files."""
    from curate.media.samples import write_video_with_cuts

    root = tmp_path_factory.mktemp("videos")
    shutil.copy(cut_video[0], root / "cuts.mp4")
    shutil.copy(cut_video[0], root / "z_copy.mp4")  # listed after: the copy
    write_video_with_cuts(root / "slideshow.mp4", [2.0, 2.0], (320, 180), fps=FPS, seed=5,
                          still=True)
    shutil.copy(ROOT / "examples" / "videos" / "shard-videos.tar", root)
    shutil.copytree(BROKEN, root / "broken")
    return root


def video_config(media, store, **run) -> dict:
    models = tiny_models()
    return {
        "name": "videos",
        "store": {"uri": str(store), "table": "clips"},
        "run": {"commit_every": 4, "num_cpus": 2, **run},
        "stages": [
            {"type": "ingest_videos", "paths": [str(media)]},
            {"type": "split_clips", "method": "scenes", "min_clip_s": 1.0, "max_clip_s": 4.0,
             "clips_per_block": 2},
            {"type": "motion_score", "min_score": 0.5},
            {"type": "image_quality", "min_side": 64},
            {"type": "exact_dedup", "keep": "first"},  # by uri
            {"type": "phash_dedup", "max_distance": 4},
            {"type": "clip_embed", "model": str(models / "tiny-clip"),
             "resources": {"batch_size": 4}},  # small: rows reach the table steadily
            {"type": "aesthetic_score", "weights": str(models / "tiny-aesthetic.safetensors"),
             "sha256": "a7dcec5e39fdfd39452c466904035a155376b4be761ce794d54fc6257fbc5740"},
            {"type": "semantic_dedup", "eps": 0.001},
        ],
    }


def clips_table(store) -> pa.Table:
    return lancedb.connect(str(store)).open_table("clips").to_arrow().sort_by("sample_id")


@pytest.fixture(scope="module")
def video_store(ray_session, video_corpus, tmp_path_factory):
    store = tmp_path_factory.mktemp("video-store") / "store"
    Pipeline.from_config(load_config(video_config(video_corpus, store))).run(progress=False)
    return store


def test_a_video_run_writes_clip_rows_and_reasons(video_store, cut_video):
    rows = clips_table(video_store).to_pylist()
    by_file: dict[str, list[dict]] = {}
    for row in rows:
        by_file.setdefault(row["uri"].split("/")[-1], []).append(row)
    cuts = sorted(by_file["cuts.mp4"], key=lambda r: r["clip_index"])
    assert [r["media_type"] for r in cuts] == ["video_clip"] * len(cuts)
    assert len({r["sample_id"] for r in rows}) == len(rows)
    assert {r["input_id"] for r in cuts} == {cuts[0]["input_id"]}
    starts = [round(r["clip_start_s"] * FPS) for r in cuts]
    true = [0, *cut_video[1]]
    # shots over max_clip_s (4 s) would be cut; none is here: one clip per shot
    assert len(starts) == len(true) and all(abs(a - b) <= 2 for a, b in zip(starts, true))
    for r in cuts:
        assert r["selected"], r["reject_reason"]
        assert r["num_frames"] == round((r["clip_end_s"] - r["clip_start_s"]) * FPS)
        assert r["width"] == 640 and r["fps"] == FPS and r["input_rows"] >= 1
        assert r["blur"] is not None and r["phash"] is not None
        assert abs(np.linalg.norm(r["clip_embedding"]) - 1) < 1e-4
        assert r["aesthetic_score"] is not None and r["motion_score"] > 0.5
    assert cuts[-1]["input_rows"] == len(cuts)
    # the copy's clips are the same spans of the same bytes: exact duplicates
    copies = by_file["z_copy.mp4"]
    assert len(copies) == len(cuts)
    assert all(r["reject_reason"].startswith("exact_dedup") for r in copies)
    assert all(r["reject_reason"].startswith("motion_score") for r in by_file["slideshow.mp4"])
    assert [r["media_type"] for r in by_file["pan.mp4"]] == ["video_clip"]
    assert by_file["pan.mp4"][0]["alt_text"] == "a slow pan over a photo"
    errors = {name: rs[0]["error"].split(":")[0] for name, rs in by_file.items()
              if rs[0]["media_type"] == "video"}
    assert errors == {"empty.mp4": "empty", "notes.mp4": "not_a_video",
                      "one_frame.mp4": "no_clips", "tone.m4a": "no_video_stream",
                      "truncated.mp4": "truncated"}


def test_a_pixel_stage_before_split_clips_is_a_config_error(tmp_path):
    from curate.errors import ConfigError

    raw = video_config(tmp_path, tmp_path / "store")
    raw["stages"].insert(1, {"type": "image_quality"})
    with pytest.raises(ConfigError, match="put split_clips before it"):
        Pipeline.from_config(load_config(raw))


@pytest.fixture(scope="module")
def many_videos(tmp_path_factory):
    """24 short videos of two shots each, and the broken files."""
    from curate.media.samples import write_video_with_cuts

    root = tmp_path_factory.mktemp("many-videos")
    for k in range(24):
        write_video_with_cuts(root / f"v{k:02d}.mp4", [1.5, 1.5], (320, 180), fps=FPS, seed=k)
    shutil.copytree(BROKEN, root / "broken")
    return root


def test_a_video_run_killed_with_sigkill_resumes_to_the_same_table(
        ray_session, many_videos, tmp_path):
    reference_store = tmp_path / "reference"
    Pipeline.from_config(load_config(video_config(many_videos, reference_store))).run(
        progress=False)
    reference = clips_table(reference_store)
    store = tmp_path / "store"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(video_config(many_videos, store, commit_every=2)))
    proc = subprocess.Popen([sys.executable, "-m", "curate", "run", str(config),
                             "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)

    def rows() -> int:
        try:
            return lancedb.connect(str(store)).open_table("clips").count_rows()
        except (ValueError, OSError):
            return 0

    deadline = time.monotonic() + 240
    while rows() == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    kept = rows()
    assert 0 < kept < reference.num_rows, "the run was not interrupted midway"
    resumed = Pipeline.from_config(load_config(video_config(many_videos, store))).run(
        progress=False)
    assert resumed.status == "finished"
    assert clips_table(store).equals(reference)


def test_transcode_writes_each_kept_clip_as_a_file_of_its_own(tmp_path, cut_video):
    from curate.stages import IngestVideos, SplitClips, Transcode

    ingest = IngestVideos(paths=[str(cut_video[0])])
    rows, media = ingest.load(ingest.list_inputs())
    (clips, clip_media), = SplitClips(method="fixed", clip_s=4.0,
                                      clips_per_block=8).expand(rows, media)
    stage = Transcode(directory=str(tmp_path / "clips"), max_side=320)
    out = stage.process(clips, clip_media)
    assert out["transcode_error"].to_pylist() == [None] * clips.num_rows
    for row, path in zip(clips.to_pylist(), out["clip_path"].to_pylist()):
        assert path.endswith(f"{row['sample_id']}.mp4")
        info = probe(VideoSource(path))
        assert (info.codec, info.width, info.height) == ("h264", 320, 180)
        assert info.num_frames == row["num_frames"]
    # a rerun keeps the files already written
    before = [os.stat(p).st_mtime_ns for p in out["clip_path"].to_pylist()]
    again = stage.process(clips, clip_media)["clip_path"].to_pylist()
    assert [os.stat(p).st_mtime_ns for p in again] == before


def test_short_shots_after_a_long_one_get_all_their_frames(tmp_path):
    """A long shot doubles the sampling stride to stay within the frames kept; the shots
    after it are sampled at the first spacing again, each getting frames_per_clip frames
    (with the doubled stride a 1.2 s shot could get one frame, or none and be lost)."""
    from curate.media.samples import write_video_with_cuts

    path = tmp_path / "long_then_short.mp4"
    cuts = write_video_with_cuts(path, [50.0, 1.2, 1.2, 1.2], (160, 96), fps=12, seed=3)
    clips = _clips(path, method="scenes", max_clip_s=None, min_clip_s=1.0, frames_per_clip=3)
    assert [c.start_frame for c in clips[1:]] == cuts
    assert [len(c.frames) for c in clips] == [3] * 4
