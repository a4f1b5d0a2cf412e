"""How the row stream's actor pools share a cluster's GPUs (curate.engine.pools), checked
against what the cluster holds: the GPU pools together start within the cluster's GPUs,
each may grow to what is left while the others keep one worker, and what cannot fit is
refused in one line. The runs on a real cluster with declared GPUs are in
test_multinode.py."""

from __future__ import annotations

import itertools

import pytest

from curate.config import ConfigError, load_config
from curate.engine.pools import check_gpus, plan_pools
from curate.plan import build_stages, segments

from .conftest import tiny_models

CLIP = {"type": "clip_embed", "text_column": "alt_text"}
CAPTION = {"type": "caption", "max_new_tokens": 4}
SCORE = {"type": "vlm_score", "prompt": "Rate it.", "criteria": {"q": {}},
         "dtype": "float32"}  # another engine than the caption's: a pool of its own


def pools_of(*stages: dict) -> tuple[list, dict]:
    models = tiny_models()
    paths = {"clip_embed": models / "tiny-clip", "caption": models / "tiny-llava",
             "vlm_score": models / "tiny-llava"}
    raw = [{"type": "ingest_images", "paths": ["x"]}] + [
        {"model": str(paths[s["type"]]), **s} for s in stages]
    built = build_stages(load_config({"name": "t", "stages": raw}))
    return segments(built), {s.name: i for i, s in enumerate(built)}


def gpu(n: float, **more) -> dict:
    return {"resources": {"gpus": n, **more}}


@pytest.mark.parametrize("cluster", [2.5, 3, 4, 16])
def test_gpu_pools_start_within_the_cluster_and_each_may_grow_into_the_rest(cluster):
    pools, _ = pools_of({**CLIP, **gpu(1)}, {**CAPTION, **gpu(1)},
                        {**SCORE, "name": "score", **gpu(0.5)})
    sizes = plan_pools(pools, cluster_cpus=64, cluster_gpus=cluster, rows=10**6)
    gpu_sizes = [s for s in sizes if s.gpus]
    assert [s.stages for s in gpu_sizes] == [("clip_embed",), ("caption",), ("score",)]
    # every pool starts, and all of them together within the cluster
    assert all(1 <= s.min_workers <= s.workers <= s.max_workers for s in gpu_sizes)
    assert sum(s.workers * s.gpus for s in gpu_sizes) <= cluster
    # any one pool at its largest fits beside the others at their smallest
    for grown in gpu_sizes:
        others = sum(s.min_workers * s.gpus for s in gpu_sizes if s is not grown)
        assert grown.max_workers * grown.gpus + others <= cluster
        assert (grown.max_workers + 1) * grown.gpus + others > cluster  # and uses it all
    if cluster == 16:  # an equal share of GPUs each to start with
        assert [s.workers for s in gpu_sizes] == [5, 5, 10]


def test_a_pool_with_concurrency_keeps_it_and_the_rest_share_what_is_left():
    pools, _ = pools_of({**CLIP, **gpu(1, concurrency=6)}, {**CAPTION, **gpu(2)})
    clip, caption = [s for s in plan_pools(pools, 32, 16, rows=10**6) if s.gpus]
    assert (clip.workers, clip.min_workers, clip.max_workers) == (6, 6, 6)
    assert (caption.workers, caption.min_workers, caption.max_workers) == (5, 1, 5)


def test_no_pool_grows_past_its_batches():
    pools, _ = pools_of({**CLIP, **gpu(1, batch_size=64)}, {**CAPTION, **gpu(1)})
    clip, caption = [s for s in plan_pools(pools, 8, 16, rows=100) if s.gpus]
    assert (clip.workers, clip.max_workers) == (2, 2)  # 100 rows: 2 batches of 64
    assert (caption.workers, caption.max_workers) == (4, 4)  # 4 batches of 32


def test_what_cannot_fit_is_refused_naming_the_key():
    pools, index_of = pools_of({**CLIP, **gpu(1)}, {**CAPTION, **gpu(3)})
    check_gpus(pools, [4.0], index_of)  # one node of 4: both fit
    with pytest.raises(ConfigError, match=r"stages\.2\.resources\.gpus: a worker of caption "
                                          r"asks for 3 GPUs, but no node of the cluster has "
                                          r"more than 2 \(the cluster has 4\)"):
        check_gpus(pools, [2.0, 2.0], index_of)
    with pytest.raises(ConfigError, match=r"resources\.gpus: the GPU stages' workers "
                                          r"\(clip_embed: 1 x 1, caption: 1 x 3; one each, "
                                          r"or their concurrency\) do not fit the GPUs of the "
                                          r"cluster's nodes \(3; 3 in all\)"):
        check_gpus(pools, [3.0], index_of)
    with pytest.raises(ConfigError, match=r"stages\.1\.resources\.gpus: clip_embed asks for "
                                          r"GPUs, but the cluster has none"):
        check_gpus(pools, [0.0, 0.0], index_of)
    pools, index_of = pools_of({**CLIP, **gpu(1, concurrency=3)}, {**CAPTION, **gpu(1)})
    with pytest.raises(ConfigError, match=r"clip_embed: 3 x 1, caption: 1 x 1"):
        check_gpus(pools, [3.0], index_of)
    check_gpus(pools, [2.0, 2.0], index_of)


def test_workers_are_placed_on_nodes_not_on_the_sum_of_their_gpus():
    """Three pools of 0.6 GPU each on two 1-GPU nodes: 1.8 GPUs in all, but a worker
    cannot span nodes, so the third could never start; on one 2-GPU node all three fit."""
    pools, index_of = pools_of({**CLIP, **gpu(0.6)}, {**CAPTION, **gpu(0.6)},
                               {**SCORE, "name": "score", **gpu(0.6)})
    check_gpus(pools, [2.0], index_of)
    with pytest.raises(ConfigError, match=r"do not fit the GPUs of the cluster's nodes "
                                          r"\(1, 1; 2 in all\)"):
        check_gpus(pools, [1.0, 1.0], index_of)


def test_model_pools_on_cpu_keep_one_worker_and_decoding_gets_the_cpus_left():
    pools, _ = pools_of({**CLIP, "resources": {"cpus": 2}}, {**CAPTION, **gpu(1)})
    decode, clip, caption = plan_pools(pools, 16, 2, rows=10**6)
    assert (clip.workers, clip.gpus) == (1, 0.0)
    assert decode.workers == 16 - 2 - caption.workers * caption.cpus
    for size in (decode, clip):
        assert size.min_workers == size.workers == size.max_workers
    assert list(itertools.chain(*(s.stages for s in (decode, clip, caption)))) == [
        "ingest_images", "clip_embed", "caption"]


def test_peak_workers_is_the_most_spans_over_one_instant():
    """WorkerSpans folds batch tags into one span per worker; its peak is checked against
    counting, at every batch's start and end, the workers whose span holds that instant."""
    import random

    from curate.engine.pools import WorkerSpans

    rng = random.Random(7)
    for _ in range(50):
        batches = []
        for worker in range(rng.randint(1, 6)):
            for _ in range(rng.randint(1, 4)):
                start = rng.randint(0, 20) + 0.5 * rng.randint(0, 1)
                batches.append((f"node-{worker % 2}:{100 + worker}", start,
                                start + rng.randint(0, 5)))
        spans = WorkerSpans()
        rng.shuffle(batches)
        for i in range(0, len(batches), 3):  # as the writers hand them over: a few at a time
            spans.add([f"{w}@{a:.3f}-{b:.3f}" for w, a, b in batches[i:i + 3]])
        whole = {w: (min(a for v, a, _ in batches if v == w),
                     max(b for v, _, b in batches if v == w)) for w, _, _ in batches}
        assert spans.spans == whole
        instants = {t for _, a, b in batches for t in (a, b)}
        expected = max(sum(a <= t <= b for a, b in whole.values()) for t in instants)
        assert spans.peak() == expected
    # a worker's peak memory rides on its tags; the most it reported is kept
    spans = WorkerSpans()
    spans.add(["n:1@0.000-1.000/2048", "n:2@0.000-1.000/4096"])
    spans.add(["n:1@2.000-3.000/1024"])
    assert spans.peak_kb == {"n:1": 2048, "n:2": 4096}
    assert spans.spans["n:1"] == (0.0, 3.0)
