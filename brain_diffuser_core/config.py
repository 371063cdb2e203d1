"""The paper's defaults, in one place.

Every number that Ozcelik & VanRullen (2023) fix (NSD layout constants, ridge alphas, VDVAE input
normalisation, Versatile Diffusion sampling settings) lives here as a frozen dataclass field. Pages, the CLI
and the library read them from :data:`PAPER`; nothing else hard-codes 0.75 or 37.

Override per call with :func:`dataclasses.replace`, e.g.
``replace(PAPER.stage2, strength=0.5)``.

The one switch between the project's improvements (the default) and the original scripts step for step is
:class:`Mode` (:data:`IMPROVED`, :data:`PAPER_MODE`, :func:`mode`); every difference it covers is a field
there, with its reason, and README's "Where this differs" table lists them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

__all__ = [
    "NSDConfig",
    "StageOneConfig",
    "StageTwoConfig",
    "PaperConfig",
    "PAPER",
    "Mode",
    "IMPROVED",
    "PAPER_MODE",
    "mode",
    "FEATURE_NAMES",
    "ROI_PATTERN_QUANTILE",
    "cache_root",
]

#: The three decoded feature spaces, in pipeline order.
FEATURE_NAMES: tuple[str, ...] = ("vdvae", "clip_text", "clip_vision")


def _frozen_map(d: dict) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class NSDConfig:
    """Natural Scenes Dataset layout constants (Allen et al. 2022)."""

    subjects: tuple[int, ...] = (1, 2, 5, 7)
    #: voxels with nsdgeneral label > 0 in func1pt8mm, per subject
    nsdgeneral_voxels: Mapping[int, int] = field(
        default_factory=lambda: _frozen_map({1: 15724, 2: 14278, 5: 13039, 7: 12682})
    )
    #: betas are stored as int16 scaled by this factor (percent signal change x 300)
    beta_scale: float = 300.0
    n_sessions: int = 37
    trials_per_session: int = 750
    n_stimuli: int = 73000
    stimulus_size: int = 425
    #: trials whose masterordering (1-based) is <= this show one of the shared 1000 images: the test set
    shared_cutoff: int = 1000
    captions_per_image: int = 5
    #: ddof for the train-set voxel standard deviation used to z-score train and test
    zscore_ddof: int = 1


@dataclass(frozen=True)
class StageOneConfig:
    """VDVAE (ImageNet-64 checkpoint) settings for stage 1 (low-level layout)."""

    checkpoint_name: str = "imagenet64-iter-1600000-model-ema.th"
    image_size: int = 64
    #: input normalisation: (x - pixel_mean) / pixel_std on uint8 pixel values
    pixel_mean: float = 115.9296
    pixel_std: float = 69.374
    #: the first N latent layers are decoded from fMRI; the rest are sampled from the prior
    n_feature_layers: int = 31
    #: concatenated length of those layers' latents (2x1x1 + 4x4x4 + 8x8x8 + 16x16x16 + 1x32x32, 16 channels)
    feature_dim: int = 91168
    ridge_alpha: float = 50_000.0
    #: prior temperature for the layers not predicted from fMRI
    temperature: float = 1.0
    #: pixels from the output mixture of logistics: "mean" (the most probable component's means; the
    #: project's default) or "sample" (a draw per pixel, as the original scripts). The draw adds i.i.d.
    #: per-pixel noise that carries nothing decoded from fMRI and that stage 2 must first undo; with the
    #: demo's small VDVAE it tripled the high-frequency energy of stage-1 images over the originals'.
    output: str = "mean"
    #: stage-1 image is upscaled (bicubic) to this size before stage 2
    output_size: int = 512


@dataclass(frozen=True)
class StageTwoConfig:
    """Versatile Diffusion dual-guided img2img settings for stage 2 (semantics)."""

    clip_model_id: str = "openai/clip-vit-large-patch14"
    vd_model_id: str = "shi-labs/versatile-diffusion"
    text_tokens: int = 77
    vision_tokens: int = 257
    clip_dim: int = 768
    ridge_alpha_text: float = 100_000.0
    ridge_alpha_vision: float = 60_000.0
    num_inference_steps: int = 50
    #: img2img strength: int(50 * 0.75) = 37 denoising steps are run
    strength: float = 0.75
    guidance_scale: float = 7.5
    #: dual-guidance mix: h = mix*(attn_vision(h)-h) + (1-mix)*(attn_text(h)-h) + h
    vision_mix: float = 0.6
    ddim_eta: float = 0.0
    image_size: int = 512
    vae_scaling_factor: float = 0.18215
    #: unconditional embeddings: CLIP-text of this prompt and CLIP-vision of a uniform grey image of this value
    #: (128, the mid grey; the original's zeros in [-1, 1] truncated to uint8 give 127: :data:`PAPER_MODE`)
    unconditional_prompt: str = ""
    unconditional_grey: int = 128
    #: the init latent is noised this many DDIM steps before the first denoising step (0: diffusers' img2img,
    #: noise to and denoise from t=721; 1: the original LDM sampler's off-by-one, noise to t=741, denoise from 721)
    start_noise_offset: int = 0
    #: final image to uint8 by truncation (the original's ``ToPILImage``) instead of rounding
    truncate_output: bool = False
    #: the DDIM sampler of the original scripts (LDM's ``DDIMSampler`` on Stable Diffusion's beta schedule):
    #: no x0 clipping, alpha-bar of t=0 for the last step, timesteps 1, 21, ..., 981 for 50 steps
    scheduler: Mapping[str, object] = field(default_factory=lambda: _frozen_map({
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
        "timestep_spacing": "leading"}))

    @property
    def text_mix(self) -> float:
        return 1.0 - self.vision_mix

    @property
    def denoising_steps(self) -> int:
        """Number of DDIM steps actually run for img2img (37 with the paper's settings)."""
        return int(self.num_inference_steps * self.strength)


@dataclass(frozen=True)
class PaperConfig:
    nsd: NSDConfig = field(default_factory=NSDConfig)
    stage1: StageOneConfig = field(default_factory=StageOneConfig)
    stage2: StageTwoConfig = field(default_factory=StageTwoConfig)

    def ridge_alpha(self, feature: str) -> float:
        """The paper's ridge alpha for one of :data:`FEATURE_NAMES`."""
        alphas = {
            "vdvae": self.stage1.ridge_alpha,
            "clip_text": self.stage2.ridge_alpha_text,
            "clip_vision": self.stage2.ridge_alpha_vision,
        }
        if feature not in alphas:
            raise ValueError(f"'feature' must be one of {sorted(alphas)}; {feature!r} was provided")
        return alphas[feature]


PAPER = PaperConfig()

#: ROI-optimal features (``pattern_scale="quantile"``, the project's default): the pattern-driven part goes along
#: its direction as far as this quantile of the training features (a normal quantile of their standard deviation
#: along it: 0.99 -> 2.33 sd), i.e. as far as the top 1% of training images and no further. The RMS-norm rule
#: (``"train"``) put the demo's ROI features 2.2-5 sd along it, beyond its top 1% of training images.
ROI_PATTERN_QUANTILE = 0.99


@dataclass(frozen=True)
class Mode:
    """The one switch: the project's improvements (:data:`IMPROVED`, the default) or the original scripts
    reproduced step for step (:data:`PAPER_MODE`), so a table can be set beside the published Table 1.

    Every field is a place where the two differ; README's "Where this differs" table gives the reasons.

    paper : True for :data:`PAPER_MODE`.
    rescale : prediction rescaling, "train" (leave-one-out TRAIN statistics; serves one trial) or "paper"
        (z-score across the whole test set, as the original; leaks test statistics).
    start_noise_offset, unconditional_grey, truncate_output : stage-2 settings (see :class:`StageTwoConfig`).
    clip_preprocess : CLIP-vision input, "direct" (the processor: shortest edge to 224 bicubic, centre crop) or
        "paper" (image -> 512 bilinear -> truncating uint8 -> the processor, as the original's feature scripts).
    network_resample : how images are brought to the evaluation networks' 224 px, "bicubic" or "bilinear" (the
        original's ``transforms.Resize``).
    stage1_output : VDVAE pixels, "mean" (the mixture's most probable component) or "sample" (a draw per
        pixel, as the original; see :class:`StageOneConfig`).
    pattern_scale : ROI-optimal features, "quantile" (the pattern-driven part as far along its direction as the
        top :data:`ROI_PATTERN_QUANTILE` of training features), "train" (set to the RMS train deviation norm)
        or "paper" (the original's hand-set norms; see ``BrainDiffuser.pattern_features``).
    ssim : "2d" (true 2-D SSIM) or "columns" (what the original's ``structural_similarity(grey, grey,
        multichannel=True, ...)`` computed with the scikit-image of its time: the mean of 1-D SSIMs down the
        columns, each column taken as a channel).
    """

    paper: bool
    rescale: str
    start_noise_offset: int
    unconditional_grey: int
    truncate_output: bool
    clip_preprocess: str
    network_resample: str
    ssim: str
    stage1_output: str = "mean"
    pattern_scale: str = "quantile"

    @property
    def name(self) -> str:
        return "paper" if self.paper else "improved"

    def stage1_overrides(self) -> dict[str, object]:
        """The :class:`StageOneConfig` fields this mode sets."""
        return {"output": self.stage1_output}

    def stage2_overrides(self) -> dict[str, object]:
        """The :class:`StageTwoConfig` fields this mode sets (for ``dataclasses.replace`` or ``**overrides``)."""
        return {"start_noise_offset": self.start_noise_offset, "unconditional_grey": self.unconditional_grey,
                "truncate_output": self.truncate_output}


IMPROVED = Mode(paper=False, rescale="train", start_noise_offset=PAPER.stage2.start_noise_offset,
                unconditional_grey=PAPER.stage2.unconditional_grey, truncate_output=PAPER.stage2.truncate_output,
                clip_preprocess="direct", network_resample="bicubic", ssim="2d")
PAPER_MODE = Mode(paper=True, rescale="paper", start_noise_offset=1, unconditional_grey=127, truncate_output=True,
                  clip_preprocess="paper", network_resample="bilinear", ssim="columns", stage1_output="sample",
                  pattern_scale="paper")


def mode(paper: bool = False) -> Mode:
    """:data:`PAPER_MODE` if ``paper`` else :data:`IMPROVED`."""
    return PAPER_MODE if paper else IMPROVED


def cache_root() -> Path:
    """Folder for prepared arrays and the MiniNSD world.

    ``$BRAIN_DIFFUSER_CACHE`` if set, else ``$XDG_CACHE_HOME/brain-diffuser-explorer`` (``~/.cache/...``).
    """
    env = os.environ.get("BRAIN_DIFFUSER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "brain-diffuser-explorer"
