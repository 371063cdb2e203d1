"""Tiny random CLIP and Versatile Diffusion models in the real on-disk layouts, for tests and demos.

The builders write folders with ``save_pretrained`` exactly as the published checkpoints are laid out, so
tests exercise the same loading code (:meth:`ClipFeatureExtractor.from_pretrained`,
:func:`load_versatile_diffusion`) that real weights go through. Nothing is downloaded.

:func:`vd_configs` returns the component configurations: ``size="real"`` matches
``shi-labs/versatile-diffusion`` (image UNet 320/640/1280/1280 with 768-d cross-attention, flat text UNet,
KL-VAE 128/256/512/512, DDIM, CLIP ViT-L/14), so a benchmark can build the real-size architectures with
random weights; ``size="tiny"`` keeps every architectural constraint of the real model (77 text tokens,
257 image tokens, CLIP ``projection_dim`` == UNet ``cross_attention_dim``, mirrored image/text UNet block
layouts) while a whole img2img call runs on CPU in well under a second.
"""
from __future__ import annotations

import copy
import json
import string
from pathlib import Path
from typing import Any

import torch

from .io import atomic_dir, atomic_write_json

__all__ = ["vd_configs", "make_tiny_clip", "make_tiny_vd", "TINY_IMAGE_SIZE", "DEMO_IMAGE_SIZE", "VD_SUBFOLDERS"]

#: side (pixels) of the images the tiny VD decodes: latent 8x8 with the tiny three-level VAE (factor 4)
TINY_IMAGE_SIZE = 32
#: side (pixels) of the images the demo VD decodes: the MiniNSD world's 64 px, latent 4 x 16 x 16 (factor 4)
DEMO_IMAGE_SIZE = 64

#: the subfolders of a Versatile Diffusion checkpoint in diffusers' layout, and their classes
VD_SUBFOLDERS: dict[str, tuple[str, str]] = {
    "image_unet": ("diffusers", "UNet2DConditionModel"),
    "text_unet": ("diffusers", "UNetFlatConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "scheduler": ("diffusers", "DDIMScheduler"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
    "image_feature_extractor": ("transformers", "CLIPImageProcessor"),
}

_OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
_SIZES = ("real", "tiny", "demo")


def _unet_blocks(with_attn: list[bool], flat: bool) -> dict[str, Any]:
    suffix = "Flat" if flat else "2D"
    down = [("CrossAttnDownBlock" if a else "DownBlock") + suffix for a in with_attn]
    up = [("CrossAttnUpBlock" if a else "UpBlock") + suffix for a in reversed(with_attn)]
    mid = "UNetMidBlockFlatCrossAttn" if flat else "UNetMidBlock2DCrossAttn"
    return {"down_block_types": down, "up_block_types": up, "mid_block_type": mid}


def vd_configs(size: str = "real") -> dict[str, dict[str, Any]]:
    """Configuration dicts of every Versatile Diffusion component, keyed by subfolder name.

    Parameters
    ----------
    size : {"real", "tiny", "demo"}
        ``"real"``: the architecture of ``shi-labs/versatile-diffusion`` (as converted by diffusers'
        ``convert_versatile_diffusion_to_diffusers.py``) with CLIP ViT-L/14. ``"tiny"``: the same
        constraints at toy width (cross-attention dim 32, images of :data:`TINY_IMAGE_SIZE` pixels).
        ``"demo"``: the MiniNSD demo's generator, the tiny CLIP with a VD that draws the world's
        :data:`DEMO_IMAGE_SIZE` pixels: VAE 32/32/64 channels (latent 4 x 16 x 16, no mid-block attention,
        so it is fully convolutional and trains on crops), UNet 32/64/64 with cross-attention only at the
        8 x 8 level (attention at 16 x 16 cost 3x the step time on CPU; MININSD-PROBE: more steps of a small
        model beat fewer of a big one).

    Returns
    -------
    dict
        Keys ``image_unet``, ``text_unet``, ``vae``, ``scheduler``, ``text_encoder`` (CLIPTextConfig kwargs),
        ``image_encoder`` (CLIPVisionConfig kwargs), ``image_feature_extractor`` (processor kwargs).
        The dicts are fresh copies; callers may modify them.
    """
    if size not in _SIZES:
        raise ValueError(f"'size' must be one of {list(_SIZES)}; {size!r} was provided")
    with_attn = {"real": [True, True, True, False], "tiny": [True, False], "demo": [False, True, False]}[size]
    if size == "real":
        channels, layers, heads, cross, latent_hw = [320, 640, 1280, 1280], 2, 8, 768, 64
        vae_channels, vae_layers, vae_sample, vae_groups = [128, 256, 512, 512], 2, 256, 32
        text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                    hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        clip_px = 224
        text_in = 768
    else:
        if size == "tiny":
            channels, layers, heads, cross, latent_hw = [32, 64], 1, 8, 32, TINY_IMAGE_SIZE // 4
            vae_channels, vae_layers, vae_sample, vae_groups = [8, 16, 16], 1, TINY_IMAGE_SIZE, 8
        else:
            channels, layers, heads, cross, latent_hw = [32, 64, 64], 1, 8, 32, DEMO_IMAGE_SIZE // 4
            vae_channels, vae_layers, vae_sample, vae_groups = [32, 32, 64], 1, DEMO_IMAGE_SIZE, 8
        vocab = _tiny_vocab()
        text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, projection_dim=cross,
                    hidden_act="quick_gelu", bos_token_id=vocab["<|startoftext|>"],
                    eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
        # 257 image tokens, as the real ViT-L/14 at 224 px: (32 / 2)^2 + 1
        vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=2, projection_dim=cross, hidden_act="quick_gelu")
        clip_px = 32
        text_in = 16
    image_unet = dict(sample_size=latent_hw, in_channels=4, out_channels=4, block_out_channels=channels,
                      layers_per_block=layers, cross_attention_dim=cross, attention_head_dim=heads,
                      **_unet_blocks(with_attn, flat=False))
    text_unet = dict(sample_size=None, in_channels=[text_in, 1, 1], out_channels=[text_in, 1, 1],
                     block_out_channels=channels, layers_per_block=layers, cross_attention_dim=cross,
                     attention_head_dim=heads, **_unet_blocks(with_attn, flat=True))
    vae = dict(sample_size=vae_sample, in_channels=3, out_channels=3, latent_channels=4,
               block_out_channels=vae_channels, layers_per_block=vae_layers, norm_num_groups=vae_groups,
               down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
               up_block_types=["UpDecoderBlock2D"] * len(vae_channels), scaling_factor=0.18215)
    if size == "demo":
        image_unet["norm_num_groups"] = text_unet["norm_num_groups"] = 8  # 32 groups do not divide 32 channels
        vae["mid_block_add_attention"] = False
    scheduler = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    processor = dict(do_resize=True, size={"shortest_edge": clip_px}, resample=3, do_center_crop=True,
                     crop_size={"height": clip_px, "width": clip_px}, do_rescale=True, rescale_factor=1 / 255,
                     do_normalize=True, image_mean=_OPENAI_MEAN, image_std=_OPENAI_STD, do_convert_rgb=True)
    return copy.deepcopy({
        "image_unet": image_unet, "text_unet": text_unet, "vae": vae, "scheduler": scheduler,
        "text_encoder": text, "image_encoder": vision, "image_feature_extractor": processor,
    })


def _tiny_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary: every printable letter/digit/punctuation, alone and word-final."""
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def _write_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(_tiny_vocab()))
    # no merges: words tokenise to characters, all of which (plain and word-final) are in the vocabulary
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)


def _clip_models(cfgs: dict[str, dict[str, Any]], seed: int):
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    torch.manual_seed(seed)
    text = CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["text_encoder"])).eval()
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfgs["image_encoder"])).eval()
    return text, vision


def _processor(cfgs: dict[str, dict[str, Any]]):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**cfgs["image_feature_extractor"])


def make_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP in the plain layout of ``openai/clip-vit-large-patch14``.

    One folder with ``config.json`` (a ``CLIPModel``: text and vision towers with projections),
    ``model.safetensors``, the tokenizer files and ``preprocessor_config.json``. The towers are the ones
    :func:`make_tiny_vd` writes for the same ``seed``. Returns the folder.
    """
    from transformers import CLIPConfig, CLIPModel

    cfgs = vd_configs("tiny")
    text, vision = _clip_models(cfgs, seed)
    config = CLIPConfig(text_config=cfgs["text_encoder"], vision_config=cfgs["image_encoder"],
                        projection_dim=cfgs["text_encoder"]["projection_dim"])
    model = CLIPModel(config).eval()
    model.text_model.load_state_dict(text.text_model.state_dict())
    model.text_projection.load_state_dict(text.text_projection.state_dict())
    model.vision_model.load_state_dict(vision.vision_model.state_dict())
    model.visual_projection.load_state_dict(vision.visual_projection.state_dict())
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _write_tokenizer(tmp)
        _processor(cfgs).save_pretrained(tmp)
    return Path(folder)


def make_tiny_vd(folder: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write a tiny random Versatile Diffusion checkpoint in diffusers' layout.

    Subfolders ``image_unet``, ``text_unet``, ``vae``, ``scheduler``, ``tokenizer``, ``text_encoder``,
    ``image_encoder``, ``image_feature_extractor`` and a ``model_index.json``, each written with
    ``save_pretrained`` (weights as safetensors). ``size``: ``"tiny"`` (images of :data:`TINY_IMAGE_SIZE`
    pixels) or ``"demo"`` (:data:`DEMO_IMAGE_SIZE`; see :func:`vd_configs`). Returns the folder.
    """
    if size not in ("tiny", "demo"):
        raise ValueError(f"'size' must be one of ['tiny', 'demo']; {size!r} was provided")
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    cfgs = vd_configs(size)
    text, vision = _clip_models(cfgs, seed)
    torch.manual_seed(seed + 1)
    image_unet = UNet2DConditionModel(**cfgs["image_unet"]).eval()
    text_unet = UNetFlatConditionModel(**cfgs["text_unet"]).eval()
    vae = AutoencoderKL(**cfgs["vae"]).eval()
    with atomic_dir(folder) as tmp:
        for name, module in [("image_unet", image_unet), ("text_unet", text_unet), ("vae", vae),
                             ("text_encoder", text), ("image_encoder", vision)]:
            module.save_pretrained(tmp / name, safe_serialization=True)
        DDIMScheduler(**cfgs["scheduler"]).save_pretrained(tmp / "scheduler")
        _write_tokenizer(tmp / "tokenizer")
        _processor(cfgs).save_pretrained(tmp / "image_feature_extractor")
        index = {"_class_name": "VersatileDiffusionPipeline", "_diffusers_version": diffusers.__version__}
        index.update({k: list(v) for k, v in VD_SUBFOLDERS.items()})
        atomic_write_json(tmp / "model_index.json", index)
    return Path(folder)
