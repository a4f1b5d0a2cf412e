"""Captions per second of the `caption` stage inside a curate pipeline (ingest + caption,
start-up included) against a bare `generate` loop over the same images with the same
model, prompt and decoding settings, in the same run.

    python benchmarks/caption.py --images 200 --size small     # CPU
    python benchmarks/caption.py --images 2000 --size large    # LLaVA-1.5-7B shapes, GPU

The model has random weights (no checkpoint can be downloaded here); decoding is greedy
with a fixed number of new tokens, so both sides do the same work. The last line printed
is a JSON object.
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

PROMPT = "Describe this image in one detailed sentence."


def bare_loop(paths: list[Path], model_dir: Path, batch_size: int, tokens: int,
              device: str, dtype: str | None = None) -> float:
    """The loop one writes by hand; returns seconds (model load excluded)."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    dtype = getattr(torch, dtype) if dtype else (
        torch.float16 if device == "cuda" else torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start:start + batch_size]]
        inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt",
                           padding=True).to(device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False)
        processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return time.perf_counter() - started


def pipeline_config(media: Path, store: Path, model_dir: Path, batch_size: int, tokens: int,
                    gpus: float) -> dict:
    return {
        "name": "bench-caption",
        "store": {"uri": str(store)},
        "stages": [
            {"type": "ingest_images", "paths": [str(media)]},
            {"type": "caption", "model": str(model_dir), "prompt": PROMPT,
             "max_new_tokens": tokens, "min_new_tokens": tokens,
             "resources": {"batch_size": batch_size, "gpus": gpus}},
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", choices=["tiny", "small", "large"], default="small")
    parser.add_argument("--image-size", default="1024x768", help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per caption")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from curate.models.tiny import build_llava

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-bench-caption-"))
    model_dir = stand_in_model(workdir, "llava", args.size, build_llava)
    paths, media, small, (width, height) = photo_inputs(workdir, args.images,
                                                        args.image_size, 8)
    print(f"inputs: {len(paths)} JPEGs of {width}x{height}; LLaVA {args.size} on {device}; "
          f"{args.tokens} new tokens each", flush=True)

    loop_s = bare_loop(paths, model_dir, args.batch_size, args.tokens, device)
    print(f"bare generate loop: {loop_s:.1f} s, {len(paths) / loop_s:.2f} captions/s",
          flush=True)
    gpus = 1 if device == "cuda" else 0
    startup_s, run_s, peak_mb, _ = startup_and_run(
        lambda photos, store: pipeline_config(photos, store, model_dir, args.batch_size,
                                              args.tokens, gpus),
        small, media, workdir)
    print(f"curate run: {run_s:.1f} s, {len(paths) / run_s:.2f} captions/s", flush=True)
    print(json.dumps({
        "images": len(paths),
        "image_size": f"{width}x{height}",
        "model": f"LLaVA {args.size} (random weights)",
        "device": device,
        "cpus": os.cpu_count(),
        "batch_size": args.batch_size,
        "new_tokens": args.tokens,
        **throughput("captions", len(paths), run_s, loop_s, startup_s, peak_mb, digits=3),
    }))


if __name__ == "__main__":
    main()
