"""The demo pipeline (configs/demo.yaml) written with the Python API.

Run it: python pipelines/demo.py
"""

from __future__ import annotations

from curate import Pipeline
from curate.stages import (
    AestheticScore,
    ClipEmbed,
    ClipScore,
    DiversitySample,
    ExactDedup,
    ImageQuality,
    IngestImages,
    NsfwScore,
    PhashDedup,
    SemanticDedup,
)

#: sha256 of the stand-in aesthetic head that `python -m curate.models.tiny` builds.
STAND_IN_AESTHETIC_SHA256 = "a7dcec5e39fdfd39452c466904035a155376b4be761ce794d54fc6257fbc5740"


def build(media: str = "examples/media", store: str = "./curate_data",
          models: str = "examples/models") -> Pipeline:
    """`models` holds the stand-in CLIP and aesthetic head (see configs/demo.yaml)."""
    return Pipeline(
        "demo",
        [
            IngestImages(paths=[media], max_pixels=64_000_000),
            ImageQuality(min_side=128, min_aspect_ratio=0.33, max_aspect_ratio=3.0,
                         min_blur=10, min_brightness=15),
            ExactDedup(keep="first"),
            PhashDedup(max_distance=8, keep="largest"),
            ClipEmbed(model=f"{models}/tiny-clip", text_column="alt_text"),
            AestheticScore(weights=f"{models}/tiny-aesthetic.safetensors",
                           sha256=STAND_IN_AESTHETIC_SHA256),
            NsfwScore(max_score=0.8),
            ClipScore(),
            SemanticDedup(eps=0.01),
            DiversitySample(target=8, clusters=4),
        ],
        store={"uri": store, "table": "samples"},
        run={"commit_every": 8},
    )


if __name__ == "__main__":
    from curate.summary import print_summary

    print_summary(build().run())
