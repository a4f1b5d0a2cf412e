"""The demo pipeline (configs/demo.yaml) written with the Python API.

Run it: python pipelines/demo.py
"""

from __future__ import annotations

from curate import Pipeline
from curate.stages import ExactDedup, ImageQuality, IngestImages, PhashDedup


def build(media: str = "examples/media", store: str = "./curate_data") -> Pipeline:
    return Pipeline(
        "demo",
        [
            IngestImages(paths=[media], max_pixels=64_000_000),
            ImageQuality(min_side=128, min_aspect_ratio=0.33, max_aspect_ratio=3.0,
                         min_blur=10, min_brightness=15),
            ExactDedup(keep="first"),
            PhashDedup(max_distance=8, keep="largest"),
        ],
        store={"uri": store, "table": "samples"},
        run={"commit_every": 8},
    )


if __name__ == "__main__":
    from curate.summary import print_summary

    print_summary(build().run())
