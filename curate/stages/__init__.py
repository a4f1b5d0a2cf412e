"""Built-in stages; importing this package registers them."""

from curate.stages.dedup import ExactDedup, PhashDedup
from curate.stages.embed import ClipEmbed, ClipScore
from curate.stages.ingest import IngestImages
from curate.stages.quality import ImageQuality
from curate.stages.scores import AestheticScore, NsfwScore
from curate.stages.semantic import DiversitySample, SemanticDedup
from curate.stages.video import IngestVideos, MotionScore, SplitClips, Transcode
from curate.stages.vlm import Caption, VlmScore

__all__ = [
    "AestheticScore",
    "Caption",
    "ClipEmbed",
    "ClipScore",
    "DiversitySample",
    "ExactDedup",
    "ImageQuality",
    "IngestImages",
    "IngestVideos",
    "MotionScore",
    "NsfwScore",
    "PhashDedup",
    "SemanticDedup",
    "SplitClips",
    "Transcode",
    "VlmScore",
]
