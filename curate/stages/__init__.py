"""Built-in stages; importing this package registers them."""

from curate.stages.dedup import ExactDedup, PhashDedup
from curate.stages.ingest import IngestImages
from curate.stages.quality import ImageQuality

__all__ = ["ExactDedup", "ImageQuality", "IngestImages", "PhashDedup"]
