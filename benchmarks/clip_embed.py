"""Images per second of `clip_embed` inside a curate pipeline (ingest + clip_embed, start-up
included) against the bare model loop on the same images in the same run: decode with PIL,
the checkpoint's own processor, `get_image_features`, in batches of the same size.

    python benchmarks/clip_embed.py --images 500 --size base      # ViT-B/32, random weights
    python benchmarks/clip_embed.py --images 2000 --size large    # ViT-L/14 (on a GPU)

The model has random weights (no checkpoint can be downloaded here); speed does not depend
on the values. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    photo_inputs,
    stand_in_model,
    startup_and_run,
    throughput,
)


def bare_loop(paths: list[Path], model_dir: Path, batch_size: int, device: str) -> float:
    """The loop one writes by hand; returns seconds (model load excluded)."""
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start:start + batch_size]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = model.get_image_features(pixel_values=pixels.to(device, dtype))
        features = getattr(out, "pooler_output", out)
        (features / features.norm(dim=-1, keepdim=True)).float().cpu().numpy()
    return time.perf_counter() - started


def pipeline_config(media: Path, store: Path, model_dir: Path, batch_size: int,
                    gpus: float) -> dict:
    return {
        "name": "bench-clip",
        "store": {"uri": str(store)},
        "stages": [
            {"type": "ingest_images", "paths": [str(media)]},
            {"type": "clip_embed", "model": str(model_dir),
             "resources": {"batch_size": batch_size, "gpus": gpus}},
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", choices=["tiny", "base", "large"], default="base",
                        help="base: ViT-B/32; large: ViT-L/14")
    parser.add_argument("--image-size", default="1024x768", help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from curate.models.tiny import build_clip

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-bench-clip-"))
    model_dir = stand_in_model(workdir, "clip", args.size, build_clip)
    paths, media, small, (width, height) = photo_inputs(workdir, args.images,
                                                        args.image_size, 16)
    print(f"inputs: {len(paths)} JPEGs of {width}x{height}; model {args.size} on {device}",
          flush=True)

    loop_s = bare_loop(paths, model_dir, args.batch_size, device)
    print(f"bare model loop: {loop_s:.1f} s, {len(paths) / loop_s:.1f} images/s", flush=True)
    gpus = 1 if device == "cuda" else 0
    startup_s, run_s, peak_mb, summary = startup_and_run(
        lambda photos, store: pipeline_config(photos, store, model_dir, args.batch_size, gpus),
        small, media, workdir)
    stage = next(s for s in summary["stages"] if s["type"] == "clip_embed")
    print(f"curate run: {run_s:.1f} s, {len(paths) / run_s:.1f} images/s "
          f"(clip_embed busy {stage['seconds']:.1f} s)", flush=True)
    print(json.dumps({
        "images": len(paths),
        "image_size": f"{width}x{height}",
        "model": {"tiny": "tiny", "base": "ViT-B/32", "large": "ViT-L/14"}[args.size],
        "device": device,
        "cpus": os.cpu_count(),
        "batch_size": args.batch_size,
        **throughput("images", len(paths), run_s, loop_s, startup_s, peak_mb),
    }))


if __name__ == "__main__":
    main()
