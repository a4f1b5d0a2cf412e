"""curate against a real peer (Data-Juicer, standalone executor) and a plain loop, on the
same photos, each timed as a whole command by the same timer (../shared/peers/measure.py:
median of 3 runs, start-up included).

    python benchmarks/peers.py --images 2000

The pipeline in all three: minimum side 64 px, aspect ratio 1/3..3, exact dedup and pHash
dedup. Data-Juicer's image dedup drops rows whose pHash is exactly equal (it has no
byte-exact image dedup and no Hamming threshold), so curate runs `phash_dedup` with
`max_distance: 0` and the loop does the same; curate's run also computes its image_quality
scores (blur, brightness, contrast, saturation) on every image, which the others skip.
The Data-Juicer venv is built on first use (about 90 s, from the package registry) under
--peer (default $TMPDIR/peer); never part of `make test`. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_small_photos  # noqa: E402

PEERS = ROOT.parent / "shared" / "peers"
MIN_SIDE, MIN_RATIO, MAX_RATIO = 64, 1 / 3, 3.0


def loop(media: Path) -> int:
    """The plain loop: one process, PIL and imagehash, files in name order, keep-first.
    Returns how many images it keeps."""
    import hashlib

    import imagehash
    from PIL import Image

    seen_bytes, seen_phash, kept = set(), set(), 0
    for path in sorted(media.glob("*.jpg")):
        data = path.read_bytes()
        digest = hashlib.sha256(data).digest()
        try:
            with Image.open(path) as img:
                width, height = img.size
                if min(width, height) < MIN_SIDE or not MIN_RATIO <= width / height <= MAX_RATIO:
                    continue
                code = str(imagehash.phash(img))
        except OSError:
            continue
        if digest in seen_bytes or code in seen_phash:
            continue
        seen_bytes.add(digest)
        seen_phash.add(code)
        kept += 1
    return kept


def measure(cmd: list[str], images: int, runs: int, before: str | None = None,
            **labels) -> dict:
    """One JSON line from the shared timer: `cmd` as a whole command, `runs` times."""
    args = [sys.executable, str(PEERS / "measure.py"), "--runs", str(runs),
            "--images", str(images)]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    if before:
        args += ["--before", before]
    out = subprocess.run([*args, "--", *cmd], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def data_juicer(media: Path, peer: Path, runs: int) -> dict:
    """Data-Juicer's own harness (../shared/peers/run_dj.sh), its venv built if missing."""
    env = {**os.environ, "PEER": str(peer), "RUNS": str(runs)}
    if not (peer / "venv" / "bin" / "dj-process").exists():
        print(f"building the Data-Juicer venv in {peer}/venv (once) ...", flush=True)
        subprocess.run(["bash", str(PEERS / "install_peer.sh"), str(peer / "venv")],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    out = subprocess.run(["bash", str(PEERS / "run_dj.sh"), "standalone", str(media)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def curate_config(media: Path, store: Path) -> dict:
    return {
        "name": "peers",
        "store": {"uri": str(store)},
        "stages": [
            {"type": "ingest_images", "paths": [str(media)]},
            {"type": "image_quality", "min_side": MIN_SIDE, "min_aspect_ratio": MIN_RATIO,
             "max_aspect_ratio": MAX_RATIO},
            {"type": "exact_dedup", "keep": "first"},
            {"type": "phash_dedup", "max_distance": 0, "keep": "first"},
        ],
    }


def curate_kept(store: Path) -> int:
    import lance

    return lance.dataset(str(store / "samples.lance")).count_rows("selected = true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", default="384x288", help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--peer", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "peer")
    parser.add_argument("--skip-peer", action="store_true", help="curate and the loop only")
    parser.add_argument("--loop-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop_only:  # the loop as a whole command, timed from outside
        print(f"kept {loop(args.loop_only)}")
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-peers-"))
    width, height = (int(x) for x in args.size.split("x"))
    media = workdir / f"crops_{args.images}_{width}x{height}"
    if len(list(media.glob("*.jpg"))) != args.images:
        write_small_photos(media, args.images, (width, height), seed=0,
                           exact_copies=0.05, near_copies=0.05)
    print(f"inputs: {args.images} JPEGs of {width}x{height} in {media}", flush=True)

    results = {}
    kept_loop = subprocess.run([sys.executable, __file__, "--loop-only", str(media)],
                               check=True, capture_output=True, text=True).stdout.split()[-1]
    results["loop"] = measure([sys.executable, __file__, "--loop-only", str(media)],
                              args.images, args.runs, tool="loop")
    results["loop"]["kept"] = int(kept_loop)
    print(f"plain loop: {results['loop']['seconds_median']:.1f} s", flush=True)

    store = workdir / "store"
    config = workdir / "peers.yaml"
    config.write_text(yaml.safe_dump(curate_config(media, store)))
    curate_bin = Path(sys.executable).with_name("curate")
    results["curate"] = measure([str(curate_bin), "run", str(config), "--no-progress"],
                                args.images, args.runs, before=f"rm -rf '{store}'",
                                tool="curate")
    results["curate"]["kept"] = curate_kept(store)
    print(f"curate run: {results['curate']['seconds_median']:.1f} s", flush=True)

    if not args.skip_peer:
        results["data_juicer"] = data_juicer(media, args.peer, args.runs)
        print(f"Data-Juicer: {results['data_juicer']['seconds_median']:.1f} s", flush=True)

    seconds = {name: r["seconds_median"] for name, r in results.items()}
    summary = {
        "images": args.images,
        "image_size": f"{width}x{height}",
        "cpus": os.cpu_count(),
        **{f"{name}_seconds": round(s, 2) for name, s in seconds.items()},
        **{f"{name}_kept": r.get("kept") for name, r in results.items()},
        **{f"{name}_peak_tree_pss_mb": r.get("peak_tree_pss_mb") for name, r in results.items()},
        "curate_vs_loop": round(seconds["loop"] / seconds["curate"], 3),
    }
    if "data_juicer" in seconds:
        summary["curate_vs_data_juicer"] = round(seconds["data_juicer"] / seconds["curate"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
