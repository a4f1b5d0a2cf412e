"""caption: a vision-language model writes a caption per image (or clip)."""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from curate.stages.image._vlm import VlmParams, _VlmStage


class CaptionParams(VlmParams):
    prompt: str = Field("Describe this image in one detailed sentence.",
                        description="user prompt; {column} placeholders are filled from the "
                        "row, e.g. 'The alt text says: {alt_text}. Write a caption.'")


class Caption(_VlmStage):
    """A caption per image from a vision-language model, as `caption`."""

    type = "caption"
    Params = CaptionParams
    output_column, failure_column = "caption", "caption_error"

    def writes(self):
        return {"caption": pa.string(), "caption_error": pa.string()}

    def process(self, batch, images):
        rows, pictures = self.images(batch)
        captions: list[str | None] = [None] * batch.num_rows
        errors: list[str | None] = [None] * batch.num_rows
        if rows:
            texts, failures = self.generate(pictures, self.conversations(batch, rows))
            for i, text, error in zip(rows, texts, failures):
                captions[i] = text if error is None else None
                errors[i] = error if error else (None if text else "empty: no caption text")
        return {"caption": pa.array(captions, pa.string()),
                "caption_error": pa.array(errors, pa.string())}
