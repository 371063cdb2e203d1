"""Versatile Diffusion dual-guided img2img from CLIP embeddings (Brain-Diffuser stage 2).

diffusers 0.42.1 ships Versatile Diffusion's components but its dual-guided pipeline encodes prompts itself,
has no img2img strength, and crashes as shipped: the UNet blocks pass ``encoder_attention_mask`` to every
transformer, which ``DualTransformer2DModel.forward`` does not accept. This module owns:

* :func:`load_versatile_diffusion`: each component from its own subfolder (the pipeline's
  ``from_pretrained`` cannot find ``UNetFlatConditionModel``), never downloading; each safetensors file's keys
  and shapes checked against its config first (a mismatch is an error naming both files, never randomly
  initialised weights); the DDIM scheduler built from the paper's constants (:func:`paper_scheduler`), the
  folder's ``scheduler_config.json`` only checked against them;
* :class:`MaskAwareDualTransformer2D`: the fix, a subclass of diffusers' ``DualTransformer2DModel`` that
  accepts ``encoder_attention_mask`` and hands each transformer the slice of it for its own condition;
* :func:`convert_to_dual_attention` / :func:`set_dual_guidance`: the image UNet's transformer blocks paired
  with the text UNet's, as diffusers' pipeline does, and the text/vision mix set on them;
* :class:`DualGuidedImg2Img`: the paper's img2img loop (VAE-encode the stage-1 image, DDIM from index
  ``N - int(N * strength)``, classifier-free guidance on text 77 + vision 257 condition tokens, decode),
  seeded per item so an image never depends on its batch position.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers.models import DualTransformer2DModel
from torch import nn

from .config import PAPER
from .features.clip import resolve_local_model
from .io import state_mismatch

__all__ = [
    "VDComponents",
    "load_versatile_diffusion",
    "paper_scheduler",
    "MaskAwareDualTransformer2D",
    "convert_to_dual_attention",
    "set_dual_guidance",
    "DualGuidedImg2Img",
]

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_FP16_WEIGHTS = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
_VD_LAYOUT = ("subfolders image_unet/, text_unet/, vae/ (config.json + diffusion_pytorch_model.safetensors "
              "each) and scheduler/ (scheduler_config.json), as in shi-labs/versatile-diffusion")

#: callback(step, total, latents, preview): step counts completed steps (1..total); latents (n, 4, h, w);
#: preview is a uint8 (n, H, W, 3) decoded image every ``preview_every`` steps, else None.
StepCallback = Callable[[int, int, torch.Tensor, "np.ndarray | None"], None]


# --------------------------------------------------------------------------------------------- loading
@dataclass
class VDComponents:
    """The Versatile Diffusion modules the dual-guided loop needs, on one device and dtype."""

    image_unet: nn.Module  # diffusers.UNet2DConditionModel
    text_unet: nn.Module  # UNetFlatConditionModel
    vae: nn.Module  # diffusers.AutoencoderKL
    scheduler: object  # diffusers.DDIMScheduler
    device: torch.device
    dtype: torch.dtype


def _default_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float16 if device.type == "cuda" else torch.float32


def _weights_variant(folder: Path, source: str) -> str | None:
    """None for plain weights, "fp16" where only the fp16 variant is present; raises if neither."""
    if not (folder / "config.json").exists():
        missing = "config.json"
    elif any((folder / f).exists() for f in _DIFFUSERS_WEIGHTS):
        return None
    elif any((folder / f).exists() for f in _FP16_WEIGHTS):
        return "fp16"
    else:
        missing = " or ".join(_DIFFUSERS_WEIGHTS)
    raise FileNotFoundError(
        f"Versatile Diffusion weights: missing {missing} in {str(folder)!r}. Expected a folder with "
        f"{_VD_LAYOUT}. Get it with `hf download {source}` on a machine with internet access, or point at a "
        f"complete copy; nothing is downloaded automatically."
    )


def _read_config(path: Path, source: str) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"Versatile Diffusion weights: {str(path)!r} is not a readable JSON config ({err}). "
                         f"Expected a folder with {_VD_LAYOUT}; get a complete copy with `hf download {source}`."
                         ) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"Versatile Diffusion weights: {str(path)!r} must hold a JSON object; found "
                         f"{type(cfg).__name__}")
    return cfg


def _check_component(cls, folder: Path, variant: str | None, source: str) -> None:
    """The safetensors weights' names and shapes against the model ``config.json`` describes (meta device).

    diffusers leaves parameters the file lacks randomly initialised with only a log line; this raises
    instead, naming the weights file, the config and the first mismatched keys. ``.bin`` weights are not
    read here (that would unpickle-load them twice); diffusers then checks them.
    """
    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    weights = folder / name
    cfg_path = folder / "config.json"
    config = _read_config(cfg_path, source)
    if not weights.exists():
        return
    from safetensors import safe_open

    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as err:  # noqa: BLE001 - any config the class cannot build
        raise ValueError(f"Versatile Diffusion weights: {str(cfg_path)!r} does not describe a "
                         f"{cls.__name__} ({type(err).__name__}: {err}). Expected the config.json written with "
                         f"the weights; get a complete copy with `hf download {source}`.") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(weights), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    diff = state_mismatch(found, expected)
    if diff:
        raise ValueError(
            f"Versatile Diffusion weights: {str(weights)!r} do not match the {cls.__name__} that "
            f"{str(cfg_path)!r} describes: {diff}. The config and the weights must come from the same "
            f"checkpoint ({_VD_LAYOUT}); get a complete copy with `hf download {source}`."
        )


def paper_scheduler(folder_config: dict | None = None, where: str = "scheduler_config.json"):
    """diffusers' ``DDIMScheduler`` with the original sampler's constants (``PAPER.stage2.scheduler``).

    The constants are used whatever ``folder_config`` says: a folder converted by diffusers' script holds a
    PNDM config, from which ``DDIMScheduler.from_pretrained`` would take DDIM's defaults (``clip_sample=True``:
    x0 clamped to [-1, 1] at every step, ``set_alpha_to_one=True``, ``steps_offset=0``), none of them the
    paper's. Each key of the constants that ``folder_config`` sets to another value is named in a warning.
    """
    from diffusers import DDIMScheduler

    constants = dict(PAPER.stage2.scheduler)
    if folder_config:
        disagree = [f"{k}={folder_config[k]!r} (paper: {v!r})" for k, v in constants.items()
                    if k in folder_config and folder_config[k] != v]
        if disagree:
            warnings.warn(f"{where} disagrees with the paper's DDIM sampler on {', '.join(disagree)}; "
                          "the paper's values are used", UserWarning, stacklevel=3)
    return DDIMScheduler(**constants)


def load_versatile_diffusion(path_or_id: str | os.PathLike = PAPER.stage2.vd_model_id, device="cpu",
                             dtype: torch.dtype | None = None) -> VDComponents:
    """Load image UNet, text UNet, VAE and the paper's DDIM scheduler, each from its own subfolder.

    Parameters
    ----------
    path_or_id : a folder in diffusers' Versatile Diffusion layout, or a model id already in the Hugging Face
        cache (``local_files_only``: never downloads).
    device : where the modules are put ("cpu", "cuda", ...).
    dtype : defaults to float16 on CUDA (as the paper runs the UNet and VAE) and float32 elsewhere.

    Raises FileNotFoundError for a missing file, ValueError for an unreadable config or weights that do not
    match their config (naming both and the first mismatched keys). The scheduler is :func:`paper_scheduler`
    (a warning names any key of ``scheduler/scheduler_config.json`` that disagrees with the paper's sampler).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    root = resolve_local_model(path_or_id, "Versatile Diffusion weights", _VD_LAYOUT)
    source = str(path_or_id) if not Path(path_or_id).expanduser().exists() else PAPER.stage2.vd_model_id
    device = torch.device(device)
    dtype = _default_dtype(device, dtype)
    scheduler_cfg = root / "scheduler" / "scheduler_config.json"
    if not scheduler_cfg.exists():
        raise FileNotFoundError(
            f"Versatile Diffusion weights: missing scheduler_config.json in {str(root / 'scheduler')!r}. "
            f"Expected a folder with {_VD_LAYOUT}. Get it with `hf download {source}`."
        )
    classes = [("image_unet", UNet2DConditionModel), ("text_unet", UNetFlatConditionModel), ("vae", AutoencoderKL)]
    variants = {}
    for name, cls in classes:  # every file checked before any weights are read
        variants[name] = _weights_variant(root / name, source)
        _check_component(cls, root / name, variants[name], source)
    scheduler = paper_scheduler(_read_config(scheduler_cfg, source), str(scheduler_cfg))
    modules = {}
    for name, cls in classes:
        module = cls.from_pretrained(root, subfolder=name, torch_dtype=dtype, variant=variants[name],
                                     low_cpu_mem_usage=False, local_files_only=True)
        modules[name] = module.to(device).eval()
    return VDComponents(scheduler=scheduler, device=device, dtype=dtype, **modules)


# --------------------------------------------------------------------------------- dual attention fix
class MaskAwareDualTransformer2D(DualTransformer2DModel):
    """diffusers' ``DualTransformer2DModel`` that accepts the ``encoder_attention_mask`` UNet blocks pass.

    Built around two existing ``Transformer2DModel`` instances (no fresh weights are allocated). The
    condition tokens ``encoder_hidden_states`` (batch, sum(condition_lengths), D) are split by
    ``condition_lengths``; condition ``i`` goes through ``transformers[transformer_index_for_condition[i]]``
    and the residuals are mixed: ``out = mix_ratio * r_0 + (1 - mix_ratio) * r_1 + h``. An
    ``encoder_attention_mask`` (batch, tokens) or bias (batch, 1, tokens) is split the same way;
    ``attention_mask`` (self-attention) is ignored as in diffusers.
    """

    def __init__(self, image_transformer: nn.Module, text_transformer: nn.Module):
        nn.Module.__init__(self)
        self.transformers = nn.ModuleList([image_transformer, text_transformer])
        self.mix_ratio = 0.5
        self.condition_lengths = [PAPER.stage2.text_tokens, PAPER.stage2.vision_tokens]
        self.transformer_index_for_condition = [1, 0]

    @property
    def config(self):
        """The image transformer's config (UNet code reads ``.config`` of its attention blocks)."""
        return self.transformers[0].config

    def forward(self, hidden_states, encoder_hidden_states, timestep=None, attention_mask=None,
                cross_attention_kwargs=None, encoder_attention_mask=None, return_dict: bool = True, **_):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        total = sum(self.condition_lengths)
        if encoder_hidden_states.shape[1] != total:
            raise ValueError(
                f"'encoder_hidden_states' must have {total} tokens (condition_lengths {self.condition_lengths}); "
                f"{encoder_hidden_states.shape[1]} were provided"
            )
        residuals, start = [], 0
        for i, length in enumerate(self.condition_lengths):
            mask = None if encoder_attention_mask is None else encoder_attention_mask[..., start:start + length]
            transformer = self.transformers[self.transformer_index_for_condition[i]]
            out = transformer(hidden_states, encoder_hidden_states=encoder_hidden_states[:, start:start + length],
                              timestep=timestep, cross_attention_kwargs=cross_attention_kwargs,
                              encoder_attention_mask=mask, return_dict=False)[0]
            residuals.append(out - hidden_states)
            start += length
        output = residuals[0] * self.mix_ratio + residuals[1] * (1 - self.mix_ratio) + hidden_states
        return (output,) if not return_dict else Transformer2DModelOutput(sample=output)


def _make_diffusers_dual(image_transformer: nn.Module, text_transformer: nn.Module) -> nn.Module:
    """diffusers' own (unfixed) class, filled as its pipeline does: for tests and the parity benchmark."""
    dual = DualTransformer2DModel.__new__(DualTransformer2DModel)
    nn.Module.__init__(dual)
    dual.transformers = nn.ModuleList([image_transformer, text_transformer])
    dual.mix_ratio = 0.5
    dual.condition_lengths = [PAPER.stage2.text_tokens, PAPER.stage2.vision_tokens]
    dual.transformer_index_for_condition = [1, 0]
    return dual


def convert_to_dual_attention(image_unet: nn.Module, text_unet: nn.Module,
                              factory: Callable[[nn.Module, nn.Module], nn.Module] = MaskAwareDualTransformer2D
                              ) -> int:
    """Pair each ``Transformer2DModel`` of ``image_unet`` with the text UNet's one at the same path.

    Mirrors diffusers' ``VersatileDiffusionDualGuidedPipeline._convert_to_dual_attention`` but builds
    ``factory(image_transformer, text_transformer)`` (the fixed class by default) around the existing
    modules. Idempotent: blocks already dual are left alone. Returns the number of blocks converted.
    """
    from diffusers.models import Transformer2DModel

    duals = [name + "." for name, m in image_unet.named_modules() if isinstance(m, DualTransformer2DModel)]
    targets = [name for name, m in image_unet.named_modules()
               if type(m) is Transformer2DModel and not any(name.startswith(d) for d in duals)]
    for name in targets:
        parent_name, index = name.rsplit(".", 1)
        image_parent = image_unet.get_submodule(parent_name)
        text_block = text_unet.get_submodule(parent_name)[int(index)]
        if not isinstance(text_block, Transformer2DModel):
            raise ValueError(f"text UNet block {name!r} must be a Transformer2DModel to pair with the image UNet's; "
                             f"found {type(text_block).__name__} (the two UNets need mirrored layouts)")
        image_parent[int(index)] = factory(image_parent[int(index)], text_block)
    return len(targets)


def set_dual_guidance(image_unet: nn.Module, vision_mix: float, text_tokens: int = PAPER.stage2.text_tokens,
                      vision_tokens: int = PAPER.stage2.vision_tokens) -> int:
    """Set every dual block for a condition laid out as [text tokens, vision tokens].

    The text tokens go to the text UNet's transformer (index 1), the vision tokens to the image UNet's
    (index 0), and ``mix_ratio`` (the weight of the first condition, text) is ``1 - vision_mix``, so
    ``h = vision_mix*(attn_vision(h)-h) + (1-vision_mix)*(attn_text(h)-h) + h``. Returns the number of blocks.
    """
    count = 0
    for module in image_unet.modules():
        if isinstance(module, DualTransformer2DModel):
            module.mix_ratio = 1.0 - float(vision_mix)
            module.condition_lengths = [int(text_tokens), int(vision_tokens)]
            module.transformer_index_for_condition = [1, 0]
            count += 1
    return count


# ---------------------------------------------------------------------------------------- img2img
class DualGuidedImg2Img:
    """Brain-Diffuser's stage 2: img2img from a stage-1 image under text + vision CLIP guidance.

    Converts ``components.image_unet`` to dual attention (in place, once). Thread-safety: each call uses
    its own scheduler copy and generators; the mix ratio lives on the shared UNet, so concurrent calls with
    different ``vision_mix`` must be serialised by the caller.
    """

    def __init__(self, components: VDComponents):
        self.components = components
        self.image_unet = components.image_unet
        self.vae = components.vae
        self.device = components.device
        self.dtype = components.dtype
        convert_to_dual_attention(components.image_unet, components.text_unet)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.cross_attention_dim = int(self.image_unet.config.cross_attention_dim)

    # ---- helpers
    def _check_inputs(self, init_images, text, vision, seeds, strength, num_inference_steps, guidance_scale,
                      vision_mix, eta, uncond_text, uncond_vision, preview_every):
        n, d = len(init_images), self.cross_attention_dim
        t_tok, v_tok = PAPER.stage2.text_tokens, PAPER.stage2.vision_tokens
        if init_images.dtype != np.uint8 or init_images.ndim != 4 or init_images.shape[-1] != 3 or n == 0:
            raise ValueError("'init_images' must be a non-empty uint8 array (n, H, W, 3); "
                             f"found dtype {init_images.dtype} and shape {init_images.shape}")
        h, w = init_images.shape[1:3]
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ValueError(f"'init_images' height and width have to be divisible by {self.vae_scale_factor} "
                             f"but are {h} and {w}")
        for name, arr, shape in [("text_embeddings", text, (n, t_tok, d)),
                                 ("vision_embeddings", vision, (n, v_tok, d))]:
            if tuple(arr.shape) != shape:
                raise ValueError(f"'{name}' must have shape {shape} (n images, tokens, cross-attention dim); "
                                 f"{tuple(arr.shape)} was provided")
        if len(seeds) != n:
            raise ValueError(f"'seeds' must hold one seed per image ({n}); {len(seeds)} were provided")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"'num_inference_steps' must be a positive integer; {num_inference_steps!r} was provided")
        if not 0.0 < strength <= 1.0 or int(num_inference_steps * strength) < 1:
            raise ValueError(f"'strength' must be in (0, 1] with int(num_inference_steps * strength) >= 1; "
                             f"{strength!r} with {num_inference_steps} steps was provided")
        if guidance_scale < 1.0:
            raise ValueError(f"'guidance_scale' must be >= 1 (1 disables guidance); {guidance_scale!r} was provided")
        if not 0.0 <= vision_mix <= 1.0:
            raise ValueError(f"'vision_mix' must be in [0, 1]; {vision_mix!r} was provided")
        if eta < 0:
            raise ValueError(f"'eta' must be >= 0; {eta!r} was provided")
        if not isinstance(preview_every, int) or preview_every < 0:
            raise ValueError(f"'preview_every' must be a non-negative integer; {preview_every!r} was provided")
        if guidance_scale > 1.0:
            for name, arr, shape in [("uncond_text", uncond_text, (t_tok, d)),
                                     ("uncond_vision", uncond_vision, (v_tok, d))]:
                if arr is None:
                    raise ValueError(f"'{name}' is required when guidance_scale > 1 ({guidance_scale}): pass "
                                     "ClipFeatureExtractor.unconditional_text() / unconditional_vision()")
                if tuple(np.shape(arr)) != shape:
                    raise ValueError(f"'{name}' must have shape {shape}; {tuple(np.shape(arr))} was provided")

    def _tensor(self, x) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).to(device=self.device, dtype=self.dtype)

    def _condition(self, text, vision, uncond_text, uncond_vision, cfg: bool) -> torch.Tensor:
        """(n or 2n, 77 + 257, D): [uncond; cond] rows when guiding, text tokens before vision tokens."""
        cond = torch.cat([self._tensor(text), self._tensor(vision)], dim=1)
        if not cfg:
            return cond
        uncond = torch.cat([self._tensor(uncond_text), self._tensor(uncond_vision)], dim=0)
        return torch.cat([uncond.unsqueeze(0).expand_as(cond), cond])

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """uint8 (n, H, W, 3) -> VAE latents x scaling factor (n, 4, H/f, W/f), one posterior sample per item."""
        from diffusers.utils.torch_utils import randn_tensor

        x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        dist = self.vae.encode(x.to(device=self.device, dtype=self.dtype)).latent_dist
        noise = randn_tensor(dist.mean.shape, generator=list(generators), device=self.device, dtype=self.dtype)
        return (dist.mean + dist.std * noise) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, truncate: bool = False) -> np.ndarray:
        """Latents (n, 4, h, w) -> uint8 images (n, h*f, w*f, 3), rounded (or truncated, as the original's
        ``ToPILImage``, when ``truncate``)."""
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        image = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255
        return (image.floor() if truncate else image.round()).to(torch.uint8).cpu().numpy()

    def make_scheduler(self, num_inference_steps: int):
        """A fresh DDIM scheduler (copy of the loaded config) with its timesteps set: calls share no state."""
        scheduler = type(self.components.scheduler).from_config(self.components.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        return scheduler

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, scheduler, timesteps: torch.Tensor, condition: torch.Tensor,
                guidance_scale: float, eta: float, generators: Sequence[torch.Generator],
                callback: StepCallback | None = None, preview_every: int = 0) -> torch.Tensor:
        """The DDIM loop with classifier-free guidance over ``timesteps``; returns the final latents.

        ``condition`` is (2n, tokens, D) ([uncond; cond]) when ``guidance_scale > 1``, else (n, tokens, D).
        """
        cfg = guidance_scale > 1.0
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = self.image_unet(model_input, t, encoder_hidden_states=condition).sample
            if cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, eta=eta, generator=list(generators)).prev_sample
            if callback is not None:
                preview = self.decode_latents(latents) if preview_every and (i + 1) % preview_every == 0 else None
                callback(i + 1, total, latents, preview)
        return latents

    # ---- the call
    @torch.no_grad()
    def __call__(self, init_images: np.ndarray, text_embeddings: np.ndarray, vision_embeddings: np.ndarray, *,
                 seeds: Sequence[int], strength: float = PAPER.stage2.strength,
                 num_inference_steps: int = PAPER.stage2.num_inference_steps,
                 guidance_scale: float = PAPER.stage2.guidance_scale, vision_mix: float = PAPER.stage2.vision_mix,
                 eta: float = PAPER.stage2.ddim_eta, uncond_text: np.ndarray | None = None,
                 uncond_vision: np.ndarray | None = None, callback: StepCallback | None = None,
                 preview_every: int = 0, start_noise_offset: int = PAPER.stage2.start_noise_offset,
                 truncate_output: bool = PAPER.stage2.truncate_output) -> np.ndarray:
        """Run dual-guided img2img; one image per seed.

        Parameters
        ----------
        init_images : uint8 (n, H, W, 3), H and W divisible by the VAE factor (8 for VD; stage 1 gives 512).
        text_embeddings : (n, 77, D) VD-normalised CLIP-text tokens (D = UNet cross-attention dim, 768).
        vision_embeddings : (n, 257, D) VD-normalised CLIP-vision tokens.
        seeds : one int per image; item i's result depends only on its own inputs and seed.
        strength : fraction of the DDIM schedule run: ``int(num_inference_steps * strength)`` steps (37).
        guidance_scale : classifier-free guidance weight; 1 runs the conditional branch only.
        vision_mix : weight of the vision condition in every dual block (0.6); text gets ``1 - vision_mix``.
        eta : DDIM eta (0: deterministic given the noised start latent).
        uncond_text, uncond_vision : (77, D) and (257, D) unconditional embeddings; required when guiding.
        callback : ``callback(step, total, latents, preview)`` after each step (see :data:`StepCallback`);
            raise from it to interrupt.
        preview_every : decode a preview every this many steps (0: never).
        start_noise_offset : noise the init latent to the timestep this many DDIM steps before the first
            denoising one (0: t=721 with the paper's settings, as diffusers; 1: t=741, as the original sampler's
            ``stochastic_encode``). Capped at the schedule's first timestep.
        truncate_output : truncate instead of round when converting the final image to uint8 (the original).

        Returns
        -------
        numpy.ndarray, uint8, shape (n, H, W, 3)
        """
        from diffusers.utils.torch_utils import randn_tensor

        # 1. Check inputs
        init_images = np.asarray(init_images)
        self._check_inputs(init_images, text_embeddings, vision_embeddings, seeds, strength, num_inference_steps,
                           guidance_scale, vision_mix, eta, uncond_text, uncond_vision, preview_every)
        if isinstance(start_noise_offset, bool) or not isinstance(start_noise_offset, int) or start_noise_offset < 0:
            raise ValueError(f"'start_noise_offset' must be a non-negative integer (0 or the paper's 1); "
                             f"{start_noise_offset!r} was provided")
        cfg = guidance_scale > 1.0
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

        # 2. Set the text/vision mix on the dual transformer blocks
        set_dual_guidance(self.image_unet, vision_mix, text_embeddings.shape[1], vision_embeddings.shape[1])

        # 3. Condition tokens: text 77 + vision 257, unconditional rows first when guiding
        condition = self._condition(text_embeddings, vision_embeddings, uncond_text, uncond_vision, cfg)

        # 4. Encode the init images (one posterior sample per item, from its own generator)
        latents = self.encode_images(init_images, generators)

        # 5. Timesteps from index N - int(N * strength); noise the latents to the first of them (or, with
        #    start_noise_offset k, to the one k steps earlier, as the original sampler)
        scheduler = self.make_scheduler(num_inference_steps)
        t_start = num_inference_steps - int(num_inference_steps * strength)
        timesteps = scheduler.timesteps[t_start:]
        t_noise = scheduler.timesteps[max(t_start - int(start_noise_offset), 0)]
        noise = randn_tensor(latents.shape, generator=generators, device=self.device, dtype=self.dtype)
        latents = scheduler.add_noise(latents, noise, t_noise.reshape(1).repeat(len(latents)))

        # 6. Denoising loop with classifier-free guidance
        latents = self.denoise(latents, scheduler, timesteps, condition, guidance_scale, eta, generators,
                               callback, preview_every)

        # 7. Decode
        return self.decode_latents(latents, truncate=truncate_output)
