"""Train the demo models of the MiniNSD world: small models of the real architectures, on TRAIN images only.

``python -m brain_diffuser_core world train --out assets/demo/models [--minutes M] [--steps clip=N,...]``
(:func:`train_demo_models`) runs four stages, each resumable from its checkpoint under ``--work``:

``clip``
    transformers ``CLIPModel`` at the tiny Versatile Diffusion config (:func:`~brain_diffuser_core.tiny_models.
    vd_configs` ``("tiny")``: 77 text tokens, 257 vision tokens at 32 px, projection 32), CLIP's contrastive
    loss on (scene image, one of its five captions) pairs. Its towers become the VD folder's ``text_encoder``
    and ``image_encoder``.
``vdvae``
    :class:`~brain_diffuser_core.features.vdvae.VDVAE` at ``VDVAEConfig.tiny(64)`` (the world's 64 px), the
    ELBO of its ``forward()`` (nats per sub-pixel), gradient clipping as the original.
``vae``
    the demo ``AutoencoderKL`` (64 px <-> 4 x 16 x 16, trained on 32 px windows) as a near-identity
    autoencoder: MSE + L1 + a small KL; its ``scaling_factor`` is then set to 1 / std of the latents (the role
    0.18215 plays for the real VAE).
``unet``
    the image ``UNet2DConditionModel`` paired with the text ``UNetFlatConditionModel``'s transformer blocks
    through the project's dual attention (:func:`~brain_diffuser_core.diffusion.convert_to_dual_attention`),
    on the trained CLIP's VD-normalised text 77 (averaged over captions) + vision 257 tokens. Each item trains
    one of Versatile Diffusion's flows (:data:`FLOW_SHARES`): text-to-image (only the text attention acts),
    image variation (only the vision attention) or the dual mix used at inference (``PAPER.stage2.vision_mix``);
    10% of items get the unconditional pair ("" and a grey image) for classifier-free guidance; epsilon
    prediction on the DDIM schedule of the VD config.

Outputs (the layouts the normal loaders read): ``<out>/vdvae.safetensors`` + ``vdvae.json``
(:func:`~brain_diffuser_core.features.vdvae.load_vdvae`), ``<out>/versatile-diffusion/`` (every VD subfolder,
:func:`~brain_diffuser_core.diffusion.load_versatile_diffusion`, ``ClipFeatureExtractor.from_pretrained``) and
``<out>/training.json`` (steps, final losses, seconds per stage) and last ``<out>/MANIFEST.json`` (size and
sha256 of every model file, :func:`~brain_diffuser_core.world.demo.write_models_manifest`; the demo bundle
verifies the files against it). About 21 MB of weights in all.

Expected time on 2 CPU cores, default steps (:data:`DEFAULT_STEPS`): measured here with one thread on a busy
shared machine, a step took about 0.45 s (clip, batch 64), 0.85 s (vdvae, batch 16), 0.1 s (vae, batch 32) and
0.5 s (unet, batch 32); with 2 free cores expect roughly 0.25 / 0.5 / 0.06 / 0.3 s, i.e. about 1.5 hours in
all (MININSD-PROBE: 32 px models learn categories in 25-100 min). ``--minutes M`` caps the whole run (each stage
gets the share :data:`TIME_SHARE`); a rerun resumes from the checkpoints (``--work``, default
``<cache>/demo-training``, written every 200 steps and on Ctrl-C). Every run's learning rate falls along a half
cosine to :data:`LR_FLOOR` of its value. ``--warm-start vae,unet`` continues those stages from an existing models
folder's weights (``--reuse-from``) for ``--steps`` more steps. A GPU (``device="cuda"``) does it in minutes.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PAPER, cache_root
from ..io import atomic_dir, atomic_path, atomic_write_json
from ..seeding import seed_for

__all__ = [
    "STAGES",
    "DEFAULT_STEPS",
    "TIME_SHARE",
    "FLOW_SHARES",
    "load_train_data",
    "train_clip",
    "train_vdvae",
    "train_vae",
    "train_unet",
    "train_demo_models",
    "parse_steps",
    "generator_scenes_data",
]

STAGES: tuple[str, ...] = ("clip", "vdvae", "vae", "unet")
DEFAULT_STEPS: dict[str, int] = {"clip": 3000, "vdvae": 4000, "vae": 1500, "unet": 8000}
#: share of ``minutes`` each stage may use
TIME_SHARE: dict[str, float] = {"clip": 0.15, "vdvae": 0.35, "vae": 0.03, "unet": 0.47}
BATCH: dict[str, int] = {"clip": 64, "vdvae": 16, "vae": 32, "unet": 32}
LR: dict[str, float] = {"clip": 5e-4, "vdvae": 3e-4, "vae": 1e-3, "unet": 5e-4}
#: fraction of items trained with the unconditional condition (classifier-free guidance)
COND_DROP = 0.1
#: share of UNet training items per flow, as the weight of the text attention's residual (the dual blocks'
#: ``mix_ratio``): text-to-image (1.0), image variation (0.0) and the inference mix (1 - vision_mix). The real
#: Versatile Diffusion learnt its text and vision context layers in separate flows, so each alone draws a
#: scene and dual guidance mixes two working paths. Trained only at the inference mix (before 2026-12-07),
#: the demo UNet leant on the vision tokens: from TRUE features of subject 1's test images, text alone gave the
#: original's category 42% of the time and vision alone 28% (the mix 88%), so noisy decoded vision tokens
#: could not be outweighed by the text tokens, which are decoded nearest the right category 99% of the time.
FLOW_SHARES: dict[str, float] = {"text": 0.4, "vision": 0.4, "dual": 0.2}
_VAE_KL_WEIGHT = 1e-4
_VDVAE_GRAD_CLIP = 200.0
_GRAD_CLIP = 1.0
#: the learning rate falls from its value to this fraction of it along a half cosine over a run's steps (a
#: constant Adam rate leaves the weights jittering around the optimum: small models blur fine detail)
LR_FLOOR = 0.1
#: moving-average decay of the UNet weights that are exported (as the feasibility probe trained)
EMA_DECAY = 0.999
#: stages whose weights ``reuse`` may take from an existing models folder
REUSABLE: tuple[str, ...] = ("clip", "vdvae")
#: stages that ``warm_start`` may initialise from an existing models folder's weights (then train further)
WARM_STARTABLE: tuple[str, ...] = ("vae", "unet")
#: side of the random windows the demo VAE trains on (it is fully convolutional; see :func:`train_vae`)
VAE_CROP = 32
#: freshly drawn scenes the generator (VAE, UNet) learns from besides the world's train images
GENERATOR_SCENES = 6000


def generator_scenes_data(n: int, seed: int = 0) -> tuple[np.ndarray, list[list[str]]]:
    """``n`` fresh category-balanced scenes for the generator: uint8 (n, 64, 64, 3) images and their captions.

    Scene ``i`` is ``generate_scene(seed_for("generator-scene", i, base_seed=seed), CATEGORIES[i % 6])``:
    other seeds than any world image's (:func:`~brain_diffuser_core.world.scenes.scene_seed`), so the
    world's test images are never among them.
    """
    from .scenes import CATEGORIES, generate_scene, stack_images

    scenes = [generate_scene(seed_for("generator-scene", i, base_seed=seed), CATEGORIES[i % len(CATEGORIES)])
              for i in range(int(n))]
    return stack_images(scenes), [list(sc.captions) for sc in scenes]


# ------------------------------------------------------------------------------------------------ data
def load_train_data(world_root: str | Path) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    """The world's TRAIN images and captions (never the test images).

    Returns
    -------
    images : uint8 (n_train, 64, 64, 3)
    captions : list of n_train lists of str (non-empty captions)
    image_ids : int64 (n_train,) 0-based 73k ids
    """
    import h5py

    from ..nsd_format import CAPTIONS_NPY_NAME, NSDPaths
    from .build import read_world_info

    info = read_world_info(world_root)
    ids = np.asarray(info.train_image_ids, np.int64)
    paths = NSDPaths(Path(world_root), int(info.params["subjects"][0]))
    with h5py.File(paths.stimuli, "r") as f:
        images = np.asarray(f["imgBrick"][int(ids.min()):int(ids.max()) + 1], np.uint8)[ids - ids.min()]
    caps = np.load(paths.annotations_dir / CAPTIONS_NPY_NAME, allow_pickle=False)
    captions = [[str(c).strip() for c in caps[i] if str(c).strip()] or [""] for i in ids]
    return images, captions, ids


def _resize(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, size, size) in [-1, 1] (antialiased bilinear)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (n, 3, H, W) in [-1, 1] -> uint8 (n, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------ the loop
class _Loop:
    """Resumable optimisation loop: checkpoint ``<work>/<name>.pt`` (weights-only torch file).

    With ``ema_decay`` it also keeps an exponential moving average of the trained parameters (decay warmed up
    as ``min(decay, (1 + step) / (10 + step))``), checkpointed with the rest; :meth:`apply_ema` copies it in.
    """

    def __init__(self, name: str, module: torch.nn.Module, work: Path, lr: float, checkpoint_every: int,
                 ema_decay: float | None = None):
        self.name, self.module, self.work, self.base_lr = name, module, Path(work), float(lr)
        self.opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        self.step, self.losses = 0, []
        self.checkpoint_every = int(checkpoint_every)
        self.ema_decay = ema_decay
        self.path = self.work / f"{name}.pt"
        if self.path.is_file():
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            module.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optim"])
            self.step, self.losses = int(state["step"]), list(state["losses"])
        self.ema: dict[str, torch.Tensor] = {}
        if ema_decay is not None:
            saved = state.get("ema", {}) if self.path.is_file() else {}
            self.ema = {n: (saved[n].to(p.device) if n in saved else p.detach().clone())
                        for n, p in module.named_parameters() if p.requires_grad}

    def save(self) -> None:
        state = {"model": self.module.state_dict(), "optim": self.opt.state_dict(), "step": self.step,
                 "losses": self.losses}
        if self.ema:
            state["ema"] = {n: t.cpu() for n, t in self.ema.items()}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(float(self.ema_decay), (1.0 + self.step) / (10.0 + self.step))
        for n, p in self.module.named_parameters():
            if n in self.ema:
                self.ema[n].lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def apply_ema(self) -> None:
        """Copy the moving average into the module's parameters (no-op without ``ema_decay``)."""
        for n, p in self.module.named_parameters():
            if n in self.ema:
                p.copy_(self.ema[n])

    def run(self, loss_fn: Callable[[int], torch.Tensor], steps: int, deadline: float | None, progress: bool,
            clip: float = _GRAD_CLIP) -> list[float]:
        """Run until ``steps`` total steps or ``deadline`` (time.monotonic); returns this run's losses."""
        from tqdm.auto import tqdm

        self.module.train()
        new: list[float] = []
        bar = tqdm(total=steps, initial=min(self.step, steps), desc=f"train {self.name}", unit="step",
                   disable=not progress)
        try:
            while self.step < steps and (deadline is None or time.monotonic() < deadline):
                fall = 0.5 * (1.0 + np.cos(np.pi * min(self.step, steps) / max(steps, 1)))
                for group in self.opt.param_groups:  # from the base rate: a resumed optimiser holds the last one
                    group["lr"] = float(self.base_lr * (LR_FLOOR + (1.0 - LR_FLOOR) * fall))  # not numpy: weights-only files
                loss = loss_fn(self.step)
                self.opt.zero_grad(set_to_none=True)
                if not torch.isfinite(loss):  # skip a diverged batch, as the original VDVAE does
                    self.step += 1
                    continue
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
                self.opt.step()
                if self.ema:
                    self._update_ema()
                self.step += 1
                value = float(loss.detach())
                new.append(value)
                self.losses.append(value)
                bar.update(1)
                if self.step % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4f}")
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
            self.save()
            self.module.eval()
        return new


def _deadline(minutes: float | None) -> float | None:
    return None if minutes is None else time.monotonic() + 60.0 * float(minutes)



# ------------------------------------------------------------------------------------------------ CLIP
def _clip_model(seed: int):
    from transformers import CLIPConfig, CLIPModel

    from ..tiny_models import vd_configs

    cfgs = vd_configs("tiny")
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=cfgs["text_encoder"], vision_config=cfgs["image_encoder"],
                        projection_dim=cfgs["text_encoder"]["projection_dim"])
    return CLIPModel(config)


def train_clip(images: np.ndarray, captions: Sequence[Sequence[str]], tokenizer, processor, work: str | Path, *,
               steps: int = DEFAULT_STEPS["clip"], minutes: float | None = None, batch_size: int = BATCH["clip"],
               lr: float = LR["clip"], seed: int = 0, checkpoint_every: int = 200, progress: bool = True,
               device: str | torch.device = "cpu"):
    """Contrastive training of a tiny ``CLIPModel`` on (image, random caption of it) pairs.

    images : uint8 (n, H, W, 3) train images; captions : n lists of captions; tokenizer / processor: the
    CLIP tokenizer and image processor written into the VD folder. Returns ``(model, losses)``.
    """
    model = _clip_model(seed).to(device)
    pixels = processor(images=list(images), return_tensors="pt").pixel_values  # (n, 3, 32, 32), once
    loop = _Loop("clip", model, Path(work), lr, checkpoint_every)
    n = len(images)

    def loss_fn(step: int) -> torch.Tensor:
        rng = np.random.default_rng(seed_for("train-clip", step, base_seed=seed))
        idx = rng.choice(n, size=min(batch_size, n), replace=False)
        texts = [captions[i][int(rng.integers(len(captions[i])))] for i in idx]
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = model(input_ids=ids.to(device), pixel_values=pixels[idx].to(device), return_loss=True)
        return out.loss

    losses = loop.run(loss_fn, steps, _deadline(minutes), progress)
    return model.cpu().eval(), losses


def _towers_from(model, seed: int):
    """CLIPTextModelWithProjection / CLIPVisionModelWithProjection holding ``model``'s trained weights."""
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from ..tiny_models import vd_configs

    cfgs = vd_configs("tiny")
    text = CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["text_encoder"]))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfgs["image_encoder"]))
    text.text_model.load_state_dict(model.text_model.state_dict())
    text.text_projection.load_state_dict(model.text_projection.state_dict())
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    return text.eval(), vision.eval()


# ----------------------------------------------------------------------------------------------- VDVAE
def train_vdvae(images: np.ndarray, work: str | Path, *, steps: int = DEFAULT_STEPS["vdvae"],
                minutes: float | None = None, batch_size: int = BATCH["vdvae"], lr: float = LR["vdvae"],
                seed: int = 0, checkpoint_every: int = 200, progress: bool = True, device: str | torch.device = "cpu"):
    """ELBO training of ``VDVAE(VDVAEConfig.tiny(S))`` with S the images' side (32 or 64).

    Returns ``(model, losses)``; losses are the ELBO in nats per sub-pixel.
    """
    from ..features.vdvae import VDVAE, VDVAEConfig

    torch.manual_seed(seed)
    model = VDVAE(VDVAEConfig.tiny(int(images.shape[1]))).to(device)
    data = torch.as_tensor(images)
    loop = _Loop("vdvae", model, Path(work), lr, checkpoint_every)

    def loss_fn(step: int) -> torch.Tensor:
        rng = np.random.default_rng(seed_for("train-vdvae", step, base_seed=seed))
        idx = rng.choice(len(data), size=min(batch_size, len(data)), replace=False)
        gen = torch.Generator().manual_seed(seed_for("train-vdvae-noise", step, base_seed=seed))
        return model(data[idx], generator=gen)["elbo"]

    losses = loop.run(loss_fn, steps, _deadline(minutes), progress, clip=_VDVAE_GRAD_CLIP)
    return model.cpu().eval(), losses


# ------------------------------------------------------------------------------------------------- VAE
def train_vae(images: np.ndarray, vae, work: str | Path, *, steps: int = DEFAULT_STEPS["vae"],
              minutes: float | None = None, batch_size: int = BATCH["vae"], lr: float = LR["vae"], seed: int = 0,
              checkpoint_every: int = 200, progress: bool = True, device: str | torch.device = "cpu",
              crop: int | None = None):
    """Train the tiny ``AutoencoderKL`` ``vae`` as a near-identity autoencoder at its ``sample_size``.

    Loss: MSE + L1 (L1 keeps edges sharp where MSE alone blurs them) of the reconstruction of a posterior
    sample + ``1e-4`` x KL. ``crop``: train on random ``crop`` x ``crop`` windows (multiples of the VAE's
    downsampling factor) of the full-size images; only for a VAE without mid-block attention, which is fully
    convolutional, so it reconstructs whole images as well as windows at a quarter of the cost per step
    (measured: 0.57 s vs about 2.3 s a batch of 32 at 64 px, one CPU thread). Afterwards its config's
    ``scaling_factor`` is set to 1 / std of the latent means of the full train images. Returns ``(vae, losses)``.
    """
    size = int(vae.config.sample_size)
    data = _resize(images, size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if crop is not None:
        if vae.config.get("mid_block_add_attention", True) or crop % factor or not 0 < crop <= size:
            raise ValueError(f"'crop' needs a VAE without mid-block attention and a multiple of {factor} in "
                             f"(0, {size}]; {crop!r} was provided")
    vae.to(device)
    loop = _Loop("vae", vae, Path(work), lr, checkpoint_every)

    def loss_fn(step: int) -> torch.Tensor:
        rng = np.random.default_rng(seed_for("train-vae", step, base_seed=seed))
        idx = rng.choice(len(data), size=min(batch_size, len(data)), replace=False)
        x = data[idx]
        if crop is not None and crop < size:
            top, left = (int(v) * factor for v in rng.integers(0, (size - crop) // factor + 1, size=2))
            x = x[:, :, top:top + crop, left:left + crop]
        x = x.to(device)
        post = vae.encode(x).latent_dist
        gen = torch.Generator().manual_seed(seed_for("train-vae-noise", step, base_seed=seed))
        rec = vae.decode(post.sample(generator=gen)).sample
        return (F.mse_loss(rec, x) + F.l1_loss(rec, x)
                + _VAE_KL_WEIGHT * post.kl().mean() / x[0].numel())

    losses = loop.run(loss_fn, steps, _deadline(minutes), progress)
    with torch.no_grad():
        means = torch.cat([vae.encode(data[s:s + 256].to(device)).latent_dist.mean.cpu()
                           for s in range(0, len(data), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std().clamp_min(1e-6)))
    return vae.cpu().eval(), losses


# ------------------------------------------------------------------------------------------------ UNet
def _unconvert(image_unet) -> None:
    """Put back the image UNet's own transformers where dual blocks were (for state dicts and saving)."""
    from diffusers.models import DualTransformer2DModel

    for name, module in list(image_unet.named_modules()):
        if isinstance(module, DualTransformer2DModel):
            parent_name, index = name.rsplit(".", 1)
            image_unet.get_submodule(parent_name)[int(index)] = module.transformers[0]


class _DualUNet(torch.nn.Module):
    """The image UNet and the text UNet as one module, state dict in their own (unconverted) layouts."""

    def __init__(self, image_unet, text_unet):
        super().__init__()
        self.image_unet, self.text_unet = image_unet, text_unet

    def dual(self) -> None:
        from ..diffusion import convert_to_dual_attention, set_dual_guidance

        convert_to_dual_attention(self.image_unet, self.text_unet)
        set_dual_guidance(self.image_unet, PAPER.stage2.vision_mix)

    def state_dict(self, *args, **kwargs):
        _unconvert(self.image_unet)
        try:
            return super().state_dict(*args, **kwargs)
        finally:
            self.dual()

    def load_state_dict(self, state, *args, **kwargs):
        _unconvert(self.image_unet)
        try:
            return super().load_state_dict(state, *args, **kwargs)
        finally:
            self.dual()

    def forward(self, latents, t, condition, text_weight: torch.Tensor | None = None):
        """Predicted noise; ``text_weight`` (batch,): each item's weight of the text residual (its flow),
        default the inference mix."""
        from diffusers.models import DualTransformer2DModel

        from ..diffusion import set_dual_guidance

        if text_weight is not None:
            mix = text_weight.to(latents).view(-1, 1, 1, 1)
            for module in self.image_unet.modules():
                if isinstance(module, DualTransformer2DModel):
                    module.mix_ratio = mix
        try:
            return self.image_unet(latents, t, encoder_hidden_states=condition).sample
        finally:
            if text_weight is not None:  # back to the scalar inference mix (the blocks are dual already)
                set_dual_guidance(self.image_unet, PAPER.stage2.vision_mix)


def train_unet(latent_mean: torch.Tensor, latent_std: torch.Tensor, text: np.ndarray, vision: np.ndarray,
               uncond_text: np.ndarray, uncond_vision: np.ndarray, image_unet, text_unet, scheduler,
               work: str | Path, *, steps: int = DEFAULT_STEPS["unet"], minutes: float | None = None,
               batch_size: int = BATCH["unet"], lr: float = LR["unet"], seed: int = 0, checkpoint_every: int = 200,
               progress: bool = True, device: str | torch.device = "cpu"):
    """Train the dual-guided image UNet (plus the text UNet's transformer blocks) to predict noise.

    latent_mean, latent_std : (n, 4, h, w) scaled VAE posterior of the train images (already x scaling factor).
    text, vision : (n, 77, D), (n, 257, D) VD-normalised CLIP conditions of the same images.
    uncond_text, uncond_vision : (77, D), (257, D) unconditional embeddings (used for ``COND_DROP`` of items).
    scheduler : the VD DDIM scheduler (its ``alphas_cumprod`` define the forward process).
    Returns ``(image_unet, text_unet, losses)`` with the image UNet in its plain (unconverted) layout and the
    weights replaced by their moving average (:data:`EMA_DECAY`).
    """
    net = _DualUNet(image_unet, text_unet)
    # the text UNet's own resnets never run in dual guidance: train only its transformer blocks
    for name, p in text_unet.named_parameters():
        p.requires_grad_(".attentions." in name)
    net.dual()
    net.to(device)
    loop = _Loop("unet", net, Path(work), lr, checkpoint_every, ema_decay=EMA_DECAY)
    acp = scheduler.alphas_cumprod.float()
    n_t = int(scheduler.config.num_train_timesteps)
    text_t, vision_t = torch.as_tensor(text).float(), torch.as_tensor(vision).float()
    ut, uv = torch.as_tensor(uncond_text).float(), torch.as_tensor(uncond_vision).float()
    flow_p = torch.tensor([FLOW_SHARES[k] for k in ("text", "vision", "dual")], dtype=torch.float64)
    flow_text_weight = torch.tensor([1.0, 0.0, 1.0 - PAPER.stage2.vision_mix])

    def loss_fn(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_for("train-unet", step, base_seed=seed))
        idx = torch.randperm(len(latent_mean), generator=g)[:batch_size]
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)
        t = torch.randint(0, n_t, (len(idx),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
        drop = (torch.rand(len(idx), generator=g) < COND_DROP).view(-1, 1, 1)
        tx = torch.where(drop, ut.expand_as(text_t[idx]), text_t[idx])
        vx = torch.where(drop, uv.expand_as(vision_t[idx]), vision_t[idx])
        flow = torch.multinomial(flow_p, len(idx), replacement=True, generator=g)
        pred = net(noisy.to(device), t.to(device), torch.cat([tx, vx], dim=1).to(device),
                   text_weight=flow_text_weight[flow])
        return F.mse_loss(pred, eps.to(device))

    losses = loop.run(loss_fn, steps, _deadline(minutes), progress)
    loop.apply_ema()  # export the moving average (the raw weights stay in the checkpoint for resuming)
    _unconvert(image_unet)
    for p in text_unet.parameters():
        p.requires_grad_(True)
    return image_unet.cpu().eval(), text_unet.cpu().eval(), losses


# ----------------------------------------------------------------------------------------- the whole run
def parse_steps(text: str | None) -> dict[str, int]:
    """``"clip=300,unet=2000"`` -> steps per stage (others keep :data:`DEFAULT_STEPS`); ``"all=3"`` sets all."""
    steps = dict(DEFAULT_STEPS)
    if not text:
        return steps
    for item in text.split(","):
        key, _, value = item.strip().partition("=")
        if key not in STAGES + ("all",) or not value.strip().isdigit():
            raise ValueError(f"'--steps' items must look like STAGE=N with STAGE in {list(STAGES) + ['all']}; "
                             f"{item!r} was provided")
        for k in (STAGES if key == "all" else (key,)):
            steps[k] = int(value)
    return steps


def _stage_minutes(minutes: float | None, stage: str) -> float | None:
    return None if minutes is None else float(minutes) * TIME_SHARE[stage]


def train_demo_models(
    out: str | Path,
    *,
    world_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    work: str | Path | None = None,
    steps: Mapping[str, int] | None = None,
    minutes: float | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    generator_scenes: int = GENERATOR_SCENES,
    reuse: Sequence[str] = (),
    reuse_from: str | Path | None = None,
    warm_start: Sequence[str] = (),
) -> Path:
    """Train the four stages on the world's train images and write the demo models to ``out``.

    Parameters
    ----------
    out : folder for ``vdvae.safetensors`` (+ ``.json``), ``versatile-diffusion/``, ``training.json`` and
        ``MANIFEST.json`` (written last).
    world_root : a built world (default: ``ensure_world(cache_dir)``, the app's world).
    work : checkpoints and the staged VD folder (default ``<cache>/demo-training``); a rerun resumes there.
    steps : stage -> total optimisation steps (default :data:`DEFAULT_STEPS`; 0 keeps a stage untrained).
    minutes : wall-clock cap of the whole run, shared by the stages as :data:`TIME_SHARE`.
    threads : torch threads (default: leave as set).
    device : where the models train ("cpu", "cuda", ...); the exported weights are float32 CPU tensors.
    generator_scenes : freshly drawn scenes (:func:`generator_scenes`) added to the world's train images for
        the VAE and the UNet, as the real Versatile Diffusion learnt from images that are not NSD's. They are
        never the world's test images (other seeds).
    reuse : stages among ``("clip", "vdvae")`` whose trained weights are taken from ``reuse_from`` (default
        ``out``: the models already there) instead of being trained again; the others are trained.
    warm_start : stages among ``("vae", "unet")`` that start from ``reuse_from``'s weights (instead of random
        ones) and then train ``steps[stage]`` further steps with a fresh optimiser; ``training.json`` records
        the steps the starting weights already had (``prior_steps``). A checkpoint under ``work`` still wins,
        so an interrupted warm-started run resumes where it stopped.
    Returns ``out``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    from ..features.clip import ClipFeatureExtractor
    from ..features.vdvae import save_vdvae
    from ..tiny_models import make_tiny_vd
    from .build import ensure_world
    from .demo import write_models_manifest

    if threads:
        torch.set_num_threads(int(threads))
    steps = {**DEFAULT_STEPS, **dict(steps or {})}
    bad = {k: v for k, v in steps.items() if k not in STAGES or int(v) < 0}
    if bad:
        raise ValueError(f"'steps' must map stages {list(STAGES)} to integers >= 0; {bad} was provided")
    reuse = tuple(reuse)
    if not set(reuse) <= set(REUSABLE):
        raise ValueError(f"'reuse' must name stages among {list(REUSABLE)}; {list(reuse)!r} was provided")
    reuse_from = Path(reuse_from) if reuse_from is not None else Path(out)
    for stage in reuse:
        need = reuse_from / ("vdvae.safetensors" if stage == "vdvae" else "versatile-diffusion/text_encoder")
        if not need.exists():
            raise FileNotFoundError(f"'reuse' names {stage!r} but {need} does not exist; train it (leave it out "
                                    "of --reuse) or point --reuse-from at a models folder that has it")
    warm_start = tuple(warm_start)
    if not set(warm_start) <= set(WARM_STARTABLE):
        raise ValueError(f"'warm_start' must name stages among {list(WARM_STARTABLE)}; {list(warm_start)!r} "
                         "was provided")
    for stage in warm_start:
        for sub in (("vae",) if stage == "vae" else ("image_unet", "text_unet")):
            need = reuse_from / "versatile-diffusion" / sub
            if not need.is_dir():
                raise FileNotFoundError(f"'warm_start' names {stage!r} but {need} does not exist; point "
                                        "--reuse-from at a models folder that has it")
    prior = _prior_steps(reuse_from)
    start_vd = {stage: (reuse_from / "versatile-diffusion" if stage in warm_start else None)
                for stage in WARM_STARTABLE}
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    world_root = Path(world_root) if world_root is not None else ensure_world(cache)
    work = Path(work) if work is not None else cache / "demo-training"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(out)
    record: dict = {"world_root": str(world_root), "seed": seed, "steps_asked": steps, "minutes": minutes,
                    "torch_threads": torch.get_num_threads(), "stages": {}}

    # 1. Data (train split only) and the staged VD folder (random tiny components to start from)
    images, captions, _ = load_train_data(world_root)
    stage_vd = work / "versatile-diffusion"
    if not (stage_vd / "model_index.json").is_file():
        make_tiny_vd(stage_vd, seed=seed, size="demo")
    tokenizer = CLIPTokenizer.from_pretrained(stage_vd / "tokenizer")
    processor = CLIPImageProcessorPil.from_pretrained(stage_vd / "image_feature_extractor")

    def done(stage: str, t0: float, losses: list[float], ckpt_losses: list[float]) -> None:
        record["stages"][stage] = {"steps": len(ckpt_losses), "seconds_this_run": round(time.perf_counter() - t0, 1),
                                   "first_loss": ckpt_losses[0] if ckpt_losses else None,
                                   "final_loss": float(np.mean(ckpt_losses[-50:])) if ckpt_losses else None}

    # 2. CLIP
    t0 = time.perf_counter()
    if "clip" in reuse:
        from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        for sub in ("text_encoder", "image_encoder"):
            shutil.copytree(reuse_from / "versatile-diffusion" / sub, stage_vd / sub, dirs_exist_ok=True)
        text_tower = CLIPTextModelWithProjection.from_pretrained(stage_vd / "text_encoder").eval()
        vision_tower = CLIPVisionModelWithProjection.from_pretrained(stage_vd / "image_encoder").eval()
        record["stages"]["clip"] = {"reused_from": str(reuse_from)}
    else:
        clip_model, losses = train_clip(images, captions, tokenizer, processor, work, steps=steps["clip"],
                                        minutes=_stage_minutes(minutes, "clip"), seed=seed, progress=progress,
                                        device=device)
        text_tower, vision_tower = _towers_from(clip_model, seed)
        text_tower.save_pretrained(stage_vd / "text_encoder", safe_serialization=True)
        vision_tower.save_pretrained(stage_vd / "image_encoder", safe_serialization=True)
        done("clip", t0, losses, _ckpt_losses(work, "clip"))

    # 3. VDVAE at the world's resolution
    t0 = time.perf_counter()
    if "vdvae" in reuse:
        from ..features.vdvae import load_vdvae

        vdvae = load_vdvae(reuse_from / "vdvae.safetensors")
        record["stages"]["vdvae"] = {"reused_from": str(reuse_from)}
    else:
        vdvae, losses = train_vdvae(images, work, steps=steps["vdvae"],
                                    minutes=_stage_minutes(minutes, "vdvae"), seed=seed, progress=progress,
                                    device=device)
        done("vdvae", t0, losses, _ckpt_losses(work, "vdvae"))

    # 4. VAE of Versatile Diffusion, on the train images and the generator's own scenes
    extra_images, extra_captions = generator_scenes_data(generator_scenes, seed=seed)
    gen_images = np.concatenate([images, extra_images]) if len(extra_images) else images
    gen_captions = list(captions) + extra_captions
    record["generator_images"] = {"world_train": len(images), "generator_scenes": len(extra_images)}
    t0 = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(start_vd["vae"] or stage_vd, subfolder="vae", low_cpu_mem_usage=False)
    vae, losses = train_vae(gen_images, vae, work, steps=steps["vae"], minutes=_stage_minutes(minutes, "vae"),
                            seed=seed, progress=progress, device=device, crop=VAE_CROP)
    vae.save_pretrained(stage_vd / "vae", safe_serialization=True)
    done("vae", t0, losses, _ckpt_losses(work, "vae"))
    if "vae" in warm_start:
        record["stages"]["vae"].update(warm_started_from=str(reuse_from), prior_steps=prior.get("vae", 0))

    # 5. UNet on the trained CLIP's conditions and the trained VAE's latents
    t0 = time.perf_counter()
    clip = ClipFeatureExtractor(tokenizer, text_tower, vision_tower, processor, device=device)
    with torch.no_grad():
        text = clip.text_embeddings_batch(gen_captions)
        vision = clip.vision_embeddings(gen_images, batch_size=256)
        x = _resize(gen_images, int(vae.config.sample_size))
        vae.to(device)
        dists = [vae.encode(x[s:s + 256].to(device)).latent_dist for s in range(0, len(x), 256)]
        sf = float(vae.config.scaling_factor)
        mean = torch.cat([d.mean.cpu() for d in dists]) * sf
        std = torch.cat([d.std.cpu() for d in dists]) * sf
        vae.cpu()
    unet_src = start_vd["unet"] or stage_vd
    image_unet = UNet2DConditionModel.from_pretrained(unet_src, subfolder="image_unet", low_cpu_mem_usage=False)
    text_unet = UNetFlatConditionModel.from_pretrained(unet_src, subfolder="text_unet", low_cpu_mem_usage=False)
    scheduler = DDIMScheduler.from_pretrained(stage_vd, subfolder="scheduler")
    image_unet, text_unet, losses = train_unet(
        mean, std, text, vision, clip.unconditional_text(), clip.unconditional_vision(), image_unet, text_unet,
        scheduler, work, steps=steps["unet"], minutes=_stage_minutes(minutes, "unet"), seed=seed, progress=progress,
        device=device)
    image_unet.save_pretrained(stage_vd / "image_unet", safe_serialization=True)
    text_unet.save_pretrained(stage_vd / "text_unet", safe_serialization=True)
    done("unet", t0, losses, _ckpt_losses(work, "unet"))
    if "unet" in warm_start:
        record["stages"]["unet"].update(warm_started_from=str(reuse_from), prior_steps=prior.get("unet", 0))

    # 6. Export in the real layouts
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out / "versatile-diffusion") as tmp:
        shutil.copytree(stage_vd, tmp, dirs_exist_ok=True)
    save_vdvae(vdvae, out / "vdvae.safetensors")
    record["trained"] = {k: (k in reuse) or record["stages"][k]["steps"] >= steps[k] for k in STAGES}
    atomic_write_json(out / "training.json", record)
    write_models_manifest(out)  # sizes + sha256 of every model file: the demo verifies them before use
    return out


def _prior_steps(models_dir: Path) -> dict[str, int]:
    """Total steps each stage of ``models_dir`` had (its ``training.json``: own steps + their prior steps)."""
    import json

    try:
        stages = json.loads((Path(models_dir) / "training.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {}
    return {k: int(v.get("steps", 0)) + int(v.get("prior_steps", 0)) for k, v in stages.items() if "steps" in v}


def _ckpt_losses(work: Path, stage: str) -> list[float]:
    path = Path(work) / f"{stage}.pt"
    if not path.is_file():
        return []
    return [float(v) for v in torch.load(path, map_location="cpu", weights_only=True)["losses"]]
