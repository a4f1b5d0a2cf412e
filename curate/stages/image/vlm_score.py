"""vlm_score: a vision-language model rates images on criteria named in the config and
answers in JSON."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from curate.stage import ScoreFilter, Threshold
from curate.stages.image._vlm import VlmParams, _VlmStage


class Criterion(BaseModel):
    """One thing the model rates."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["integer", "number", "boolean", "string"] = "integer"
    min: float | None = None
    max: float | None = None
    choices: list[str] | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _range(self):
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if self.choices and self.type != "string":
            raise ValueError("choices are for type: string")
        return self


_ARROW = {"integer": pa.int32(), "number": pa.float32(), "boolean": pa.bool_(),
          "string": pa.string()}


class VlmScoreParams(VlmParams):
    prompt: str = Field("Rate this image.", description="user prompt; the answer format is "
                        "appended; {column} placeholders are filled from the row")
    criteria: dict[str, Criterion] = Field(description="name -> {type, min, max, choices, "
                                           "description}; the model answers each in JSON")
    score: str | None = Field(None, description="criterion written as vlm_score (default: "
                              "the first integer or number criterion)")
    min_score: float | None = Field(None, description="drop rows whose vlm_score is below")
    max_new_tokens: int = Field(96, ge=1, le=8192, description="tokens to generate at most")

    @field_validator("criteria")
    @classmethod
    def _names(cls, value):
        if not value:
            raise ValueError("name at least one criterion")
        for name in value:
            if not name.isidentifier():
                raise ValueError(f"criterion name {name!r} must be a plain identifier")
        return value

    @model_validator(mode="after")
    def _score(self):
        numeric = [n for n, c in self.criteria.items() if c.type in ("integer", "number")]
        if self.score is None:
            if not numeric:
                raise ValueError("no integer or number criterion to use as vlm_score")
            self.score = numeric[0]
        elif self.score not in numeric:
            raise ValueError(f"score {self.score!r} must name an integer or number "
                             f"criterion ({', '.join(numeric) or 'none'})")
        return self


class VlmScore(_VlmStage, ScoreFilter):
    """A vision-language model rates each image on the configured criteria, answering in
    JSON (schema-guided on vLLM; parsed strictly with one retry otherwise). Writes
    `vlm_score` (the main criterion) and `vlm_scores` (all of them); an answer that is
    still invalid leaves them null and says why in `vlm_score_error`."""

    type = "vlm_score"
    Params = VlmScoreParams
    verdict_column = "vlm_score_reason"
    threshold_params = ("min_score",)
    output_column, failure_column = "vlm_scores", "vlm_score_error"

    @cached_property
    def _criteria(self) -> dict[str, dict[str, Any]]:
        return {n: c.model_dump() for n, c in self.params.criteria.items()}

    def written_names(self):
        return ("vlm_score", "vlm_scores", "vlm_score_error", "vlm_score_reason")

    def writes(self):
        struct = pa.struct([(n, _ARROW[c.type]) for n, c in self.params.criteria.items()])
        return {"vlm_score": pa.float32(), "vlm_scores": struct,
                "vlm_score_error": pa.string(), "vlm_score_reason": pa.string()}

    def _ask(self, batch, rows, pictures, suffix, schema):
        from curate.models.vlm import AnswerError, parse_answer

        texts, failures = self.generate(pictures, self.conversations(batch, rows, suffix),
                                        schema)
        answers, errors = [], []
        for text, failure in zip(texts, failures):
            if failure:  # the engine's failure, said as it is (`unfinished` knows it)
                answers.append(None)
                errors.append(failure)
                continue
            try:
                answers.append(parse_answer(text, self._criteria))
                errors.append(None)
            except AnswerError as exc:
                answers.append(None)
                errors.append(f"invalid_answer: {exc}; answer was {text!r}"[:500])
        return answers, errors

    def prompt_suffix(self) -> str:
        from curate.models.vlm import answer_instructions

        return "\n" + answer_instructions(self._criteria)

    def score(self, batch, images):
        from curate.models.vlm import json_schema

        p = self.params
        schema = json_schema(self._criteria)
        suffix = self.prompt_suffix()
        rows, pictures = self.images(batch)
        answers: list[dict | None] = [None] * batch.num_rows
        errors: list[str | None] = [None] * batch.num_rows
        if rows:
            got, why = self._ask(batch, rows, pictures, suffix, schema)
            retry = [k for k, answer in enumerate(got) if answer is None]
            if retry and not getattr(self.engine, "guided", False):
                again, why_again = self._ask(
                    batch, [rows[k] for k in retry], [pictures[k] for k in retry],
                    suffix + "\nReply with the JSON object only, nothing else.", schema)
                for k, answer, error in zip(retry, again, why_again):
                    got[k], why[k] = answer, error
            for i, answer, error in zip(rows, got, why):
                answers[i], errors[i] = answer, error
        main = np.array([np.nan if a is None else float(a[p.score]) for a in answers],
                        np.float32)
        return {"vlm_score": pa.array(main, pa.float32(), mask=np.isnan(main)),
                "vlm_scores": pa.array(answers, self.writes()["vlm_scores"]),
                "vlm_score_error": pa.array(errors, pa.string())}

    def thresholds(self):
        return [Threshold("vlm_score", "vlm_score", minimum=self.params.min_score)]
