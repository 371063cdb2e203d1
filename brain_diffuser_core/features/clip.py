"""CLIP text and vision features normalised as Versatile Diffusion conditions on them.

Versatile Diffusion does not condition on CLIP's pooled embedding but on every token, projected and
divided by the norm of the pooled (text) or class-token (vision) embedding:

* text: ``text_projection(last_hidden_state) / ||text_embeds||``, shape (77, D);
* vision: ``visual_projection(post_layernorm(last_hidden_state)) / ||token 0||``, shape (257, D).

Brain-Diffuser regresses fMRI onto these arrays (D = 768 for CLIP ViT-L/14). The unconditional
embeddings used by classifier-free guidance are the text features of ``PAPER.stage2.unconditional_prompt``
("") and the vision features of a uniform grey image (``PAPER.stage2.unconditional_grey``).

Weights are read from a local folder or from the user's Hugging Face cache; nothing is ever downloaded.

``preprocess="paper"`` reproduces the original feature scripts' image path for CLIP-vision: the image is
first resized to 512 px (bilinear) and truncated to uint8, and only then given to the processor (224 bicubic).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..config import PAPER

__all__ = ["ClipFeatureExtractor", "resolve_local_model", "paper_resize"]

#: the size the original scripts bring every image to before CLIP's own preprocessing
PAPER_PRE_SIZE = 512
PREPROCESS_MODES = ("direct", "paper")

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")

_PLAIN_LAYOUT = ("config.json, model.safetensors, vocab.json + merges.txt (or tokenizer.json), "
                 "preprocessor_config.json (the layout of openai/clip-vit-large-patch14)")
_VD_LAYOUT = ("tokenizer/, text_encoder/, image_encoder/, image_feature_extractor/ subfolders "
              "(the layout of shi-labs/versatile-diffusion)")


def resolve_local_model(path_or_id: str | os.PathLike, what: str, layout: str) -> Path:
    """A local folder for ``path_or_id``: the folder itself, or the Hugging Face cache snapshot of that id.

    Never downloads (``local_files_only=True``). Raises :class:`FileNotFoundError` naming the expected
    layout and how to obtain the weights when neither exists.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{what} must be a folder ({layout}); {str(path)!r} is a file")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(str(path_or_id), local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError for non-id strings, ...
        raise FileNotFoundError(
            f"{what}: {str(path_or_id)!r} is neither a folder nor a model in the Hugging Face cache "
            f"({HF_HUB_CACHE}). Expected a folder with {layout}. Get it on a machine with internet access "
            f"with `hf download {path_or_id}` (it lands in the cache) or copy such a folder here and pass "
            f"its path; nothing is downloaded automatically. ({type(exc).__name__})"
        ) from None


def _require(folder: Path, any_of: Sequence[str], what: str, layout: str, source: str) -> None:
    if not any((folder / name).exists() for name in any_of):
        names = " or ".join(any_of)
        raise FileNotFoundError(
            f"{what}: missing {names} in {str(folder)!r}. Expected a folder with {layout}. Get the files "
            f"with `hf download {source}` on a machine with internet access, or point at a complete copy."
        )


def paper_resize(images: np.ndarray, size: int = PAPER_PRE_SIZE) -> np.ndarray:
    """uint8 (n, H, W, 3) -> uint8 (n, size, size, 3): bilinear resize in float, then truncated to uint8.

    The original scripts' step before CLIP (``torch`` bilinear, half-pixel centres: the same as PIL's bilinear
    when enlarging 425 -> 512, and then ``.astype(uint8)``-style truncation, not rounding).
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return y.clamp(0, 255).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ClipFeatureExtractor:
    """CLIP text and vision towers with Versatile Diffusion's token-wise normalisation.

    Parameters
    ----------
    tokenizer : transformers.CLIPTokenizer
    text_encoder : transformers.CLIPTextModelWithProjection
    image_encoder : transformers.CLIPVisionModelWithProjection
    image_processor : transformers CLIP image processor (resize shortest edge, centre crop, normalise)
    device, dtype : where and in which precision the towers run; outputs are always float32 numpy.
    """

    def __init__(self, tokenizer, text_encoder, image_encoder, image_processor, device="cpu",
                 dtype: torch.dtype = torch.float32):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.to(device=device, dtype=dtype).eval()
        self.image_encoder = image_encoder.to(device=device, dtype=dtype).eval()
        self.image_processor = image_processor
        self.device = torch.device(device)
        self.dtype = dtype

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike = PAPER.stage2.clip_model_id, device="cpu",
                        dtype: torch.dtype | None = None) -> "ClipFeatureExtractor":
        """Load from a plain CLIP folder, a Versatile Diffusion folder, or the HF cache (never downloads).

        ``dtype`` defaults to float32 (features are regression targets; the towers are small).
        """
        from transformers import (CLIPImageProcessorPil, CLIPTextModelWithProjection, CLIPTokenizer,
                                  CLIPVisionModelWithProjection)
        from transformers.utils import logging as hf_logging

        layouts = f"either {_PLAIN_LAYOUT} or {_VD_LAYOUT}"
        root = resolve_local_model(path_or_id, "CLIP weights", layouts)
        source = str(path_or_id) if not Path(path_or_id).expanduser().exists() else PAPER.stage2.clip_model_id
        vd = (root / "text_encoder").is_dir() or (root / "model_index.json").exists()
        if vd:
            sub = {k: root / k for k in ("tokenizer", "text_encoder", "image_encoder", "image_feature_extractor")}
            layout = _VD_LAYOUT
        else:
            sub = dict.fromkeys(("tokenizer", "text_encoder", "image_encoder", "image_feature_extractor"), root)
            layout = _PLAIN_LAYOUT
        what = f"CLIP weights ({'Versatile Diffusion' if vd else 'plain CLIP'} layout)"
        _require(sub["tokenizer"], _TOKENIZER_FILES, what, layout, source)
        if not (sub["tokenizer"] / "tokenizer.json").exists():
            _require(sub["tokenizer"], ("merges.txt",), what, layout, source)
        for key in ("text_encoder", "image_encoder"):
            _require(sub[key], ("config.json",), what, layout, source)
            _require(sub[key], _WEIGHT_FILES, what, layout, source)
        _require(sub["image_feature_extractor"], ("preprocessor_config.json",), what, layout, source)

        kw = dict(local_files_only=True)
        previous = hf_logging.get_verbosity()
        if not vd:  # a plain CLIPModel checkpoint holds both towers: each load reports the other's keys
            hf_logging.set_verbosity_error()
        try:
            tokenizer = CLIPTokenizer.from_pretrained(sub["tokenizer"], **kw)
            text = CLIPTextModelWithProjection.from_pretrained(sub["text_encoder"], **kw)
            vision = CLIPVisionModelWithProjection.from_pretrained(sub["image_encoder"], **kw)
            processor = CLIPImageProcessorPil.from_pretrained(sub["image_feature_extractor"], **kw)
        finally:
            hf_logging.set_verbosity(previous)
        return cls(tokenizer, text, vision, processor, device=device, dtype=dtype or torch.float32)

    # ------------------------------------------------------------------ shapes
    @property
    def dim(self) -> int:
        """D: the projection dimension shared by text and vision embeddings (768 for ViT-L/14)."""
        return int(self.text_encoder.config.projection_dim)

    @property
    def text_tokens(self) -> int:
        """Number of text tokens (77): CLIP's ``max_position_embeddings``."""
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def vision_tokens(self) -> int:
        """Number of vision tokens (257 for ViT-L/14 at 224 px): patches plus the class token."""
        cfg = self.image_encoder.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), 77, D) float32 on CPU, VD-normalised."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.text_tokens, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        out = self.text_encoder(ids)
        tokens = self.text_encoder.text_projection(out.last_hidden_state)
        norm = torch.linalg.vector_norm(out.text_embeds.float(), dim=-1)[:, None, None]
        return (tokens.float() / norm).cpu()

    def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        """VD-normalised CLIP-text tokens averaged over one image's captions.

        Parameters
        ----------
        captions : list of str, at least one (empty strings are encoded like any other caption).

        Returns
        -------
        numpy.ndarray, float32, shape (77, D)
        """
        return self.text_embeddings_batch([captions])[0]

    def text_embeddings_batch(self, caption_lists: Sequence[Sequence[str]], batch_size: int = 64) -> np.ndarray:
        """:meth:`text_embeddings` for many images: (n_images, 77, D) float32.

        All captions are encoded in batches of ``batch_size`` prompts, then averaged per image.
        """
        if isinstance(caption_lists, str) or any(isinstance(c, str) for c in caption_lists):
            raise TypeError("'caption_lists' must be a list of caption lists (one list per image); "
                            "a plain string was found: use text_embeddings([...]) for one image")
        flat, owner = [], []
        for i, caps in enumerate(caption_lists):
            caps = list(caps)
            if not caps:
                raise ValueError(f"'caption_lists[{i}]' must hold at least one caption; an empty list was provided")
            flat += [str(c) for c in caps]
            owner += [i] * len(caps)
        n = len(caption_lists)
        out = np.zeros((n, self.text_tokens, self.dim), dtype=np.float32)
        if n == 0:
            return out
        chunks = [self._encode_text(flat[s:s + batch_size]) for s in range(0, len(flat), batch_size)]
        emb = torch.cat(chunks).numpy()
        owner = np.asarray(owner)
        counts = np.bincount(owner, minlength=n).astype(np.float32)
        np.add.at(out, owner, emb)
        out /= counts[:, None, None]
        return out

    def unconditional_text(self) -> np.ndarray:
        """Text embedding of ``PAPER.stage2.unconditional_prompt`` (""): (77, D) float32."""
        return self._encode_text([PAPER.stage2.unconditional_prompt])[0].numpy()

    # ------------------------------------------------------------------ vision
    @torch.no_grad()
    def _encode_vision(self, images: np.ndarray) -> torch.Tensor:
        pixels = self.image_processor(images=list(images), return_tensors="pt").pixel_values
        out = self.image_encoder(pixels.to(device=self.device, dtype=self.dtype))
        tokens = self.image_encoder.visual_projection(self.image_encoder.vision_model.post_layernorm(
            out.last_hidden_state)).float()
        norm = torch.linalg.vector_norm(tokens[:, :1], dim=-1, keepdim=True)
        return (tokens / norm).cpu()

    def vision_embeddings(self, images: np.ndarray, batch_size: int = 16, preprocess: str = "direct") -> np.ndarray:
        """VD-normalised CLIP-vision tokens of RGB images.

        Parameters
        ----------
        images : numpy.ndarray, uint8, shape (n, H, W, 3)
            Any size: the processor resizes the shortest edge and centre-crops (224 px for ViT-L/14).
        preprocess : "direct" (the processor alone) or "paper" (:func:`paper_resize` to 512 px first, as the
            original scripts; :data:`~brain_diffuser_core.config.PAPER_MODE`).

        Returns
        -------
        numpy.ndarray, float32, shape (n, 257, D)
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError("'images' must be a uint8 array of shape (n, H, W, 3); "
                             f"found dtype {images.dtype} and shape {images.shape}")
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"'preprocess' must be one of {list(PREPROCESS_MODES)}; {preprocess!r} was provided")
        out = np.zeros((len(images), self.vision_tokens, self.dim), dtype=np.float32)
        for s in range(0, len(images), batch_size):
            chunk = images[s:s + batch_size]
            if preprocess == "paper":
                chunk = paper_resize(chunk)
            out[s:s + batch_size] = self._encode_vision(chunk).numpy()
        return out

    def unconditional_vision(self, size: int = 224, grey: int | None = None) -> np.ndarray:
        """Vision embedding of a uniform grey image: (257, D) float32.

        grey : its value, default ``PAPER.stage2.unconditional_grey`` (128); the original's is 127 (zeros in
            [-1, 1] truncated to uint8). A uniform image is unchanged by any resizing, so no preprocessing
            choice applies.
        """
        value = PAPER.stage2.unconditional_grey if grey is None else int(grey)
        if not 0 <= value <= 255:
            raise ValueError(f"'grey' must be a uint8 value 0..255; {grey!r} was provided")
        return self.vision_embeddings(np.full((1, size, size, 3), value, dtype=np.uint8))[0]
