"""The GPU benchmark runs where the GPU machine runs it: without Ray, Lance or obstore."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Runs benchmarks/gpu.py with the packages a GPU machine lacks made unimportable.
_WITHOUT = """
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "lance", "lancedb", "obstore"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Absent())
sys.argv = ["gpu.py", *sys.argv[1:]]
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


def test_gpu_benchmark_needs_no_ray_or_lance(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT, str(ROOT / "benchmarks" / "gpu.py"), "--size",
         "tiny", "--images", "12", "--captions", "4", "--clip-batch", "4",
         "--caption-batch", "2", "--tokens", "2", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["clip_embed"]["images"] == 12 and figures["caption"]["images"] == 4
    assert figures["clip_ratio"] > 0 and figures["caption_ratio"] > 0
