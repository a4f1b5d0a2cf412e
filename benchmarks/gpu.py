"""One GPU, a few minutes: curate's two GPU stages as its engine runs them, each against
the bound a hand-written program reaches, in the same process.

- clip_embed: JPEGs decoded and prepared on CPU threads, a ViT-L/14-shaped CLIP in
  bfloat16 (random weights) on the GPU, against the model alone on ready pixel tensors
  already on the GPU (no decoding at all: the bound);
- caption: a LLaVA-1.5-7B-shaped model (random weights; `--llava-layers` fewer where
  memory asks), against a bare `generate` loop with the same prompt, images and decoding.

Both stages run through `curate.engine.local_stream` (the decode threads, the batches each
model pool gets, the stages' own prepare/process), with the rows counted instead of
written. So this needs CUDA torch, transformers, pyarrow, pydantic, pillow and numpy: no
Ray, no Lance (a GPU machine without them runs it).

    python benchmarks/gpu.py                                # a GPU: the shapes above
    python benchmarks/gpu.py --size tiny --images 16        # anywhere: checks the script

Ratios are the stage's steady rate (after its first batch, which pays for loading the
model) over the baseline's (its model loaded beforehand); the whole figures include the
load. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.caption import PROMPT, bare_loop  # noqa: E402

#: --size: (CLIP shapes of curate.models.tiny, LLaVA shapes, photo size).
SIZES = {"tiny": ("tiny", "tiny", "320x240"), "large": ("large", "large", "1024x768")}


def stream(stages_params: list[dict], rows: int, output: str) -> dict:
    """Run the stages (ingest_images first) through the local engine; the rows are
    counted, not written, and each must hold the last stage's `output`. Returns whole and
    steady seconds and the rows seen."""
    import pyarrow as pa

    from curate.engine import local_stream
    from curate.plan import build_stages, stamps
    from curate.registry import get_stage_class

    params = [get_stage_class(p["type"]).Params.model_validate(p) for p in stages_params]
    stages = build_stages(SimpleNamespace(stages=params))
    source = stages[0]
    parts = [source.list_entry(unit) for unit in source.list_entries()]
    seen = {"rows": 0, "first": None, "first_rows": 0}

    def count(batch: pa.Table) -> None:
        if batch[output].null_count:
            errors = {e for name in ("error", f"{output}_error") if name in batch.column_names
                      for e in batch[name].drop_null().to_pylist()}
            raise SystemExit(f"{batch[output].null_count} rows have no {output}: {errors}")
        seen["rows"] += batch.num_rows
        if seen["first"] is None:
            seen["first"], seen["first_rows"] = time.perf_counter(), batch.num_rows

    started = time.perf_counter()
    batch = stages[-1].resources.batch_size
    for _ in local_stream.stream_fragments(parts, [p.num_rows for p in parts], stages,
                                           "gpu-bench", stamps(stages), count, batch):
        pass
    ended = time.perf_counter()
    if seen["rows"] != rows:
        raise SystemExit(f"the stream made {seen['rows']} rows of {rows} inputs")
    steady_rows = seen["rows"] - seen["first_rows"]
    return {"whole_s": ended - started, "steady_s": ended - seen["first"],
            "steady_rows": steady_rows}


def clip_bound(model_dir: Path, images: int, batch_size: int, device: str) -> float:
    """Seconds of the CLIP image tower alone over `images` ready pixel tensors on the
    device, in the stage's dtype (one warm-up batch not counted)."""
    import torch
    from transformers import AutoModel

    from curate.models import torch_device

    where, dtype = torch_device(device, "auto")
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(where).eval()
    side = model.config.vision_config.image_size
    pixels = torch.randn(batch_size, 3, side, side, device=where, dtype=dtype)

    def run(batches: int) -> None:
        with torch.inference_mode():
            for _ in range(batches):
                out = model.get_image_features(pixel_values=pixels)
                features = getattr(out, "pooler_output", out)
                (features / features.norm(dim=-1, keepdim=True)).float().cpu()

    run(1)
    started = time.perf_counter()
    run(-(-images // batch_size))
    return time.perf_counter() - started


def figures(unit: str, items: int, result: dict, base_s: float, base_items: int) -> dict:
    steady = result["steady_rows"] / max(result["steady_s"], 1e-9)
    base = base_items / base_s
    return {f"stage_whole_{unit}_per_s": round(items / result["whole_s"], 2),
            f"stage_steady_{unit}_per_s": round(steady, 2),
            f"baseline_{unit}_per_s": round(base, 2),
            "ratio": round(steady / base, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--images", type=int, default=1024, help="images for clip_embed")
    parser.add_argument("--captions", type=int, default=128, help="images for caption")
    parser.add_argument("--clip-batch", type=int, default=128)
    parser.add_argument("--caption-batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per caption")
    parser.add_argument("--llava-layers", type=int, default=None,
                        help="text layers of the LLaVA (default: 32, as the 7B)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from curate.media.samples import write_photos
    from curate.models.tiny import build_clip, build_llava

    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip_size, llava_size, photo = SIZES[args.size]
    width, height = (int(x) for x in photo.split("x"))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-bench-gpu-"))
    photos = workdir / "photos"
    paths = sorted(photos.glob("*.jpg"))
    if len(paths) < max(args.images, args.captions):
        paths = write_photos(photos, max(args.images, args.captions), size=(width, height))
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()})"
    print(f"{len(paths)} JPEGs of {photo} on {name}", flush=True)
    out: dict = {"device": name, "size": args.size, "photo": photo}

    clip_dir = workdir / f"clip-{clip_size}"
    if not (clip_dir / "config.json").exists():
        build_clip(clip_dir, clip_size)
    clip_photos = workdir / "clip_photos"
    clip_photos.mkdir(exist_ok=True)
    for path in paths[:args.images]:
        if not (clip_photos / path.name).exists():
            (clip_photos / path.name).symlink_to(path)
    bound_s = clip_bound(clip_dir, args.images, args.clip_batch, device)
    clip = stream([{"type": "ingest_images", "paths": [str(clip_photos)]},
                   {"type": "clip_embed", "model": str(clip_dir),
                    "resources": {"batch_size": args.clip_batch}}], args.images,
                  "clip_embedding")
    out["clip_embed"] = {"images": args.images, "batch_size": args.clip_batch,
                         **figures("images", args.images, clip, bound_s, args.images)}
    print(f"clip_embed: {json.dumps(out['clip_embed'])}", flush=True)

    llava_dir = workdir / f"llava-{llava_size}-{args.llava_layers or 'all'}"
    if not (llava_dir / "config.json").exists():
        build_llava(llava_dir, llava_size, text_layers=args.llava_layers, device=device,
                    dtype="bfloat16" if device == "cuda" else None)
    caption_photos = workdir / "caption_photos"
    caption_photos.mkdir(exist_ok=True)
    for path in paths[:args.captions]:
        if not (caption_photos / path.name).exists():
            (caption_photos / path.name).symlink_to(path)
    dtype = "bfloat16" if device == "cuda" else "float32"
    bare_s = bare_loop(sorted(caption_photos.glob("*.jpg")), llava_dir, args.caption_batch,
                       args.tokens, device, dtype)
    caption = stream([{"type": "ingest_images", "paths": [str(caption_photos)]},
                      {"type": "caption", "model": str(llava_dir), "prompt": PROMPT,
                       "max_new_tokens": args.tokens, "min_new_tokens": args.tokens,
                       "dtype": dtype, "resources": {"batch_size": args.caption_batch}}],
                     args.captions, "caption")
    out["caption"] = {"images": args.captions, "batch_size": args.caption_batch,
                      "new_tokens": args.tokens, "text_layers": args.llava_layers or "all",
                      **figures("captions", args.captions, caption, bare_s, args.captions)}
    print(f"caption: {json.dumps(out['caption'])}", flush=True)
    print(json.dumps(out | {"clip_ratio": out["clip_embed"]["ratio"],
                            "caption_ratio": out["caption"]["ratio"]}))


if __name__ == "__main__":
    main()
