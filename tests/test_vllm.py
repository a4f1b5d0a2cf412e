"""The vLLM engine for real, on vLLM's CPU build in its own venv: `make test-vllm`.

vLLM's multimodal model classes import torchvision, and the only torchvision builds for
this torch are CUDA ones that break on a CPU torch; so here the engine runs a tiny
text-only Llama, which covers engine start-up from the stage's settings, chat templating,
sampling, and JSON-schema guided decoding. Images through vLLM run on a GPU machine.
"""

from __future__ import annotations

import pytest

from curate.models.vlm import Sampling, get_engine, json_schema, parse_answer
from curate.stages.image.vlm_score import VlmScore

pytestmark = pytest.mark.vllm

CRITERIA = {"quality": {"type": "integer", "min": 1, "max": 5},
            "watermark": {"type": "boolean"},
            "style": {"type": "string", "choices": ["photo", "drawing"]}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from curate.models.tiny import build_llama

    model = build_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")
    stage = VlmScore(model=str(model), engine="vllm", dtype="float32",
                     criteria=CRITERIA,
                     vllm={"max_model_len": 512, "max_num_seqs": 4,
                           # on the CPU backend this is the share of RAM it reserves
                           "gpu_memory_utilization": 0.1})
    return get_engine(stage.spec)


def chats(n):
    return [[{"role": "system", "content": "You rate images."},
             {"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": f"Rate item {i}."}]}]
            for i in range(n)]


def test_greedy_generation_is_reproducible(engine):
    first = engine.generate([None] * 3, chats(3), Sampling(max_new_tokens=8))
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    assert engine.generate([None] * 3, chats(3), Sampling(max_new_tokens=8)) == first


def test_guided_decoding_makes_even_a_random_model_answer_the_schema(engine):
    answers = engine.generate([None] * 4, chats(4), Sampling(max_new_tokens=60),
                              json_schema(CRITERIA))
    for text in answers:
        value = parse_answer(text, CRITERIA)  # raises if the schema was not followed
        assert set(value) == set(CRITERIA)
