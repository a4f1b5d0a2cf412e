"""open_clip for real, in its own venv (`make test-openclip`): open_clip needs a torchvision
that matches torch, and PyPI's torchvision builds are CUDA ones, which break the CPU torch
of the main venv (a CUDA torch runs on CPU, so that venv has one).

Decode workers prepare images for open_clip without building the model or reading its
weights; what they hand the model must be what open_clip's own eval transform makes."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.openclip


@pytest.fixture(scope="module")
def photos():
    """Images of several shapes: smooth gradients with noise, as JPEG-decoded RGB."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for width, height in ((400, 240), (200, 330), (500, 120), (224, 224)):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, (x + y) % 256], axis=-1)
        noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(noisy, "RGB"))
    return out


@pytest.mark.parametrize("model, pretrained", [
    ("ViT-S-32", None),
    ("ViT-B-16-SigLIP", "webli"),  # the tag's own mean, std and resize (squash)
    ("ViT-B-32", "laion2b_s34b_b79k"),
    ("ViT-S-32", "checkpoint"),  # a file: never read where the weights are not loaded
])
def test_decode_workers_prepare_as_open_clip_without_the_weights(photos, tmp_path, model,
                                                                 pretrained):
    import open_clip
    import torch

    from curate.models import ModelError
    from curate.models.embedders import load_embedder

    tag = {}
    if pretrained == "checkpoint":
        pretrained = str(tmp_path / "weights.bin")
        (tmp_path / "weights.bin").write_bytes(b"not a checkpoint")
    elif pretrained:
        tag = open_clip.get_pretrained_cfg(model, pretrained)
    embedder = load_embedder("open_clip", model, pretrained=pretrained, device="cpu",
                             load_weights=False)
    assert embedder.model is None
    # the oracle: open_clip's own model and eval transform (random weights), with the
    # preprocessing the weights tag gives (the weights themselves cannot be fetched here)
    net, _, transform = open_clip.create_model_and_transforms(
        model, pretrained=None, image_mean=tag.get("mean"), image_std=tag.get("std"),
        image_interpolation=tag.get("interpolation"),
        image_resize_mode=tag.get("resize_mode"))
    side = net.visual.image_size
    assert embedder.input_shape == (3, *((side,) * 2 if isinstance(side, int) else side))
    expected = torch.stack([transform(image) for image in photos]).numpy()
    pixels = torch.from_numpy(embedder.prepare(photos)).float()
    got = ((pixels - embedder._mean) / embedder._std).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    if pretrained and pretrained.endswith("weights.bin"):  # loading them does read the file
        with pytest.raises(ModelError, match=r"weights\.bin"):
            load_embedder("open_clip", model, pretrained=pretrained, device="cpu")
