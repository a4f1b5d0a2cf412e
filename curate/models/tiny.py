"""Randomly initialised stand-ins for the real checkpoints, built through the same code
that loads real ones (config -> save_pretrained -> from_pretrained, processor included).

No CLIP or aesthetic weights can be downloaded where the demo and the tests run, so they
use these; every one is marked as a stand-in (a STAND_IN.txt beside the weights, or
safetensors metadata) and runs print that label. Scores from them are meaningless.

    python -m curate.models.tiny examples/models        # tiny CLIP, SigLIP, aesthetic head
    python -m curate.models.tiny /tmp/b32 --only clip --size base   # ViT-B/32-sized CLIP
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from curate.models import STAND_IN_FILE

#: The vocabulary the stand-in tokenizers are trained on.
_VOCABULARY = (
    "a an the of in on with and photo picture image drawing painting close up view "
    "cat dog horse bird person people man woman child face astronaut rocket space coffee "
    "cup flower garden tree building city street china temple camera sky sea beach "
    "mountain car red green blue white black small large old new"
)

#: (vision hidden, layers, heads, patch, text hidden, projection) per size.
_SIZES = {
    "tiny": (32, 2, 2, 32, 32, 32),
    "wide": (32, 2, 2, 32, 32, 2048),  # tiny towers, 2048-d embeddings: 8 KB of vector a row
    "base": (768, 12, 12, 32, 512, 512),  # ViT-B/32
    "large": (1024, 24, 16, 14, 768, 768),  # ViT-L/14
}


def _tokenizer(kind: str, max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging

    logging.set_verbosity_error()  # the stand-in configs trip warnings meant for real ones
    logging.disable_progress_bar()

    text = [_VOCABULARY] * 4
    if kind == "clip":
        special = ["<|startoftext|>", "<|endoftext|>"]
        tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(text, trainers.BpeTrainer(
            vocab_size=400, special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=special[0], eos_token=special[1],
            pad_token=special[1], unk_token=special[1], model_max_length=max_length)
    special = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=200, special_tokens=special))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


def _like_hub(out: Path, config) -> None:
    """Rewrite out/config.json as hub configs are written (by the transformers releases
    most checkpoints were saved with): keys at their class defaults left out, in the
    sub-configs too, so the loading code must fill them in as it does for real ones."""
    import json

    from transformers import PretrainedConfig

    def lean(values: dict, current) -> dict:
        default = type(current)().to_dict()
        out = {}
        for key, value in values.items():
            inner = getattr(current, key, None)
            if isinstance(value, dict) and isinstance(inner, PretrainedConfig):
                out[key] = lean(value, inner)
            elif key in ("model_type", "architectures") or default.get(key, object()) != value:
                out[key] = value
        return out

    path = out / "config.json"
    path.write_text(json.dumps(lean(json.loads(path.read_text()), config), indent=2) + "\n")


def _mark(out: Path, what: str) -> None:
    (out / STAND_IN_FILE).write_text(
        f"stand-in: randomly initialised {what}; its outputs are meaningless\n"
        "Built by curate.models.tiny so that the loading code runs where no real weights "
        "can be downloaded. Point the config at a real checkpoint for real results.\n"
    )


def build_clip(out: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """A CLIPModel + CLIPProcessor directory (224 px input)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision, layers, heads, patch, text_hidden, projection = _SIZES[size]
    tokenizer = _tokenizer("clip", 77)
    vocab = len(tokenizer)
    config = CLIPConfig(
        text_config={"vocab_size": vocab, "hidden_size": text_hidden,
                     "intermediate_size": 4 * text_hidden, "num_hidden_layers": min(layers, 12),
                     "num_attention_heads": max(2, text_hidden // 64),
                     "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": vision, "intermediate_size": 4 * vision,
                       "num_hidden_layers": layers, "num_attention_heads": heads,
                       "image_size": 224, "patch_size": patch},
        projection_dim=projection,
    )
    torch.manual_seed(seed)
    out = Path(out)
    CLIPModel(config).save_pretrained(out)
    _like_hub(out, config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 224},
                                              crop_size={"height": 224, "width": 224}),
        tokenizer=tokenizer)
    processor.save_pretrained(out)
    _mark(out, f"CLIP ({size}, ViT patch {patch}, {projection}-d embeddings)")
    return out


def build_siglip(out: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny SiglipModel + SiglipProcessor directory (224 px input). With `hidden` 768
    (SigLIP's default) its config.json leaves the width out, as hub configs do."""
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import (
        SiglipImageProcessorPil,
    )

    tokenizer = _tokenizer("siglip", 16)
    config = SiglipConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": hidden,
                     "intermediate_size": 64, "num_hidden_layers": layers,
                     "num_attention_heads": 2,
                     "max_position_embeddings": 16, "pad_token_id": tokenizer.pad_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None},
        vision_config={"hidden_size": hidden, "intermediate_size": 64,
                       "num_hidden_layers": layers, "num_attention_heads": 2,
                       "image_size": 224, "patch_size": 32},
    )
    torch.manual_seed(seed)
    out = Path(out)
    SiglipModel(config).save_pretrained(out)
    _like_hub(out, config)
    SiglipProcessor(image_processor=SiglipImageProcessorPil(size={"height": 224, "width": 224}),
                    tokenizer=tokenizer).save_pretrained(out)
    _mark(out, "SigLIP (tiny)")
    return out


def build_linear_head(out: str | Path, dims: list[int], what: str, seed: int = 0) -> Path:
    """A safetensors state dict shaped like the LAION aesthetic predictor (`layers.N.*`),
    labelled as a stand-in in its metadata."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    state = {}
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        key = f"layers.{2 * i}"
        state[f"{key}.weight"] = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(
            np.float32)
        state[f"{key}.bias"] = np.zeros(d_out, np.float32)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={
        "stand_in": f"stand-in: randomly initialised {what}; its outputs are meaningless"})
    return out


#: A minimal chat template (system, user turns with an image, assistant prompt).
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ image_marker }}"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

#: What the stand-in VLM tokenizers are trained on: enough to spell captions and JSON.
_VLM_TEXT = _VOCABULARY + ' { } " : , . 0 1 2 3 4 5 6 7 8 9 true false yes no quality score'


def _vlm_tokenizer(special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_VLM_TEXT] * 4, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", "<pad>", *special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": special[0]},
                                   model_max_length=2048)


#: VLM sizes: (vision hidden, layers, heads, image px, patch; text hidden, layers, heads).
_VLM_SIZES = {
    "tiny": (32, 2, 2, 64, 16, 128, 2, 2),
    "small": (384, 6, 6, 224, 32, 512, 4, 8),
    "large": (1024, 24, 16, 336, 14, 4096, 32, 32),  # LLaVA-1.5-7B
}


def _text_config(tokenizer, size: str = "tiny") -> dict:
    # head_dim 64 at every size: vLLM's CPU attention refuses smaller heads
    hidden, layers, heads = _VLM_SIZES[size][5:]
    return {"vocab_size": len(tokenizer), "hidden_size": hidden,
            "intermediate_size": 2 * hidden if size == "tiny" else int(2.7 * hidden),
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": 1 if size == "tiny" else heads,
            "head_dim": 64, "max_position_embeddings": 2048,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def build_llava(out: str | Path, size: str = "tiny", seed: int = 0,
                text_layers: int | None = None, device: str = "cpu",
                dtype: str | None = None) -> Path:
    """A LlavaForConditionalGeneration + LlavaProcessor (CLIP vision tower, Llama) with
    random weights: tiny for tests, small for CPU benchmarks, large = LLaVA-1.5-7B's
    shapes for GPU ones (`text_layers` fewer where memory asks; initialised on `device`
    and saved in `dtype`, e.g. cuda and bfloat16 for the 7B shapes)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _vlm_tokenizer(["<image>"])
    vision, layers, heads, side, patch = _VLM_SIZES[size][:5]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision, intermediate_size=2 * vision,
                                       num_hidden_layers=layers, num_attention_heads=heads,
                                       image_size=side, patch_size=patch),
        text_config=LlamaConfig(**_text_config(tokenizer, size) | (
            {"num_hidden_layers": text_layers} if text_layers else {})),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    out = Path(out)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    if dtype:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    del model
    _like_hub(out, config)
    LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": side},
                                              crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_CHAT_TEMPLATE.replace("{{ image_marker }}", "<image>"),
    ).save_pretrained(out)
    _mark(out, f"LLaVA ({size})")
    return out


def build_llama(out: str | Path, seed: int = 0) -> Path:
    """A tiny text-only LlamaForCausalLM with a chat template: what vLLM's CPU build can run
    here (its multimodal models need a torchvision that matches the CPU torch)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _vlm_tokenizer(["<image>"])
    tokenizer.chat_template = _CHAT_TEMPLATE.replace("{{ image_marker }}", "")
    torch.manual_seed(seed)
    out = Path(out)
    config = LlamaConfig(**_text_config(tokenizer))
    LlamaForCausalLM(config).save_pretrained(out)
    _like_hub(out, config)
    tokenizer.save_pretrained(out)
    _mark(out, "Llama (tiny, text only)")
    return out


def build_all(out: str | Path) -> Path:
    """Everything the demo and the tests use, under `out`."""
    out = Path(out)
    build_clip(out / "tiny-clip")
    build_siglip(out / "tiny-siglip")
    build_llava(out / "tiny-llava")
    dim = _SIZES["tiny"][5]
    build_linear_head(out / "tiny-aesthetic.safetensors", [dim, 64, 16, 1],
                      "aesthetic head (LAION layout)")
    build_linear_head(out / "tiny-nsfw-head.safetensors", [dim, 16, 1], "NSFW head", seed=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--only", choices=["clip", "siglip"], default=None)
    parser.add_argument("--size", choices=sorted(_SIZES), default="tiny")
    args = parser.parse_args()
    if args.only == "clip":
        build_clip(args.out, args.size)
    elif args.only == "siglip":
        build_siglip(args.out)
    else:
        build_all(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
