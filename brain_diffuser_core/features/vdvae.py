"""Very Deep VAE (Child 2021), written for this project, loading OpenAI's public ImageNet-64 checkpoint.

Brain-Diffuser's stage 1 encodes every stimulus with the VDVAE encoder, keeps the posterior latents of the
first 31 (of 75) top-down layers as a 91,168-long feature vector, regresses that vector from fMRI, and
decodes a predicted vector by fixing those 31 layers and sampling the other 44 from the prior.

Architecture (module and parameter names match ``imagenet64-iter-1600000-model-ema.th`` exactly):

- ``encoder``: ``in_conv`` (3x3, 3 -> width) then ``enc_blocks``: bottleneck residual :class:`Block` s
  (1x1, 3x3, 3x3, 1x1 convolutions, GELU before each), some followed by average-pool downsampling. The last
  activation at each resolution conditions the decoder layers of that resolution.
- ``decoder``: ``dec_blocks`` (one latent layer each, :class:`DecBlock`: posterior ``enc``, ``prior``,
  ``z_proj``, ``resnet``), learned start maps ``bias_xs`` (one per resolution <= ``no_bias_above``),
  ``gain``/``bias`` applied to the final map and ``out_net`` (:class:`DmolNet`, a 1x1 convolution to the
  parameters of a discretised mixture of logistics, ``num_mixtures * 10`` channels for RGB).

Normal distributions are parameterised by mean and LOG STANDARD DEVIATION, as in the original.
Image pixel values are uint8 RGB, ``(n, H, W, 3)``. Encoder input is ``(x - pixel_mean) / pixel_std``
(:data:`~brain_diffuser_core.config.PAPER` ``.stage1``); the likelihood target is ``x / 127.5 - 1``.

Public API: :class:`VDVAEConfig`, :class:`VDVAE` (``forward``, ``encode``, ``decode``, ``latent_shapes``,
``feature_dim``), :func:`load_vdvae`, :func:`save_vdvae`, :func:`expected_state_dict_shapes`,
:func:`parse_layer_string`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brain_diffuser_core.config import PAPER
from brain_diffuser_core.io import atomic_path, atomic_write_json, state_mismatch
from brain_diffuser_core.seeding import seed_for

__all__ = [
    "VDVAEConfig",
    "VDVAE",
    "Block",
    "DecBlock",
    "Encoder",
    "Decoder",
    "DmolNet",
    "load_vdvae",
    "save_vdvae",
    "expected_state_dict_shapes",
    "parse_layer_string",
    "CHECKPOINT_URL",
]

#: where the paper's checkpoint is published (linked from the openai/vdvae README)
CHECKPOINT_URL = (
    "https://openaipublic.blob.core.windows.net/very-deep-vaes-assets/vdvae-assets-2/"
    "imagenet64-iter-1600000-model-ema.th"
)

#: parameters per mixture component for RGB: logit + 3 x (mean, log-scale, coefficient)
_DMOL_PARAMS_PER_MIXTURE = 10
#: lower bound of the logistic log-scales, as in the original
_MIN_LOG_SCALE = -7.0
#: safetensors metadata key holding the JSON config
_META_KEY = "vdvae_config"

# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------
def parse_layer_string(s: str) -> list[tuple[int, int | None]]:
    """Parse a VDVAE block string into ``(resolution, extra)`` pairs.

    ``"RxN"`` gives N blocks at resolution R (extra None); ``"RmM"`` one block at R mixing in the map of
    resolution M (decoder); ``"RdK"`` one block at R followed by K-fold average pooling (encoder); ``"R"``
    one block. E.g. ``"1x2,4m1"`` -> ``[(1, None), (1, None), (4, 1)]``.
    """
    if not isinstance(s, str) or not s.strip():
        raise ValueError(f"block string must be a non-empty string like '1x2,4m1,4x3'; {s!r} was provided")
    layers: list[tuple[int, int | None]] = []
    for part in s.split(","):
        try:
            if "x" in part:
                res, num = part.split("x")
                layers += [(int(res), None)] * int(num)
            elif "m" in part:
                res, mixin = part.split("m")
                layers.append((int(res), int(mixin)))
            elif "d" in part:
                res, down = part.split("d")
                layers.append((int(res), int(down)))
            else:
                layers.append((int(part), None))
        except ValueError:
            raise ValueError(
                f"block string item {part!r} of {s!r} must look like 'RxN', 'RmM', 'RdK' or 'R' "
                "with integers R, N, M, K"
            ) from None
    return layers


def _width_map(width: int, custom: str) -> dict[int, int]:
    out: dict[int, int] = {}
    if custom:
        for item in custom.split(","):
            k, v = item.split(":")
            out[int(k)] = int(v)
    return out


@dataclass(frozen=True)
class VDVAEConfig:
    """Hyper-parameters of a VDVAE (names as in openai/vdvae ``hps.py``).

    Parameters
    ----------
    image_size : int
        Side of the square RGB images the model works at (pixels).
    width : int
        Channels of the residual stream (unless ``custom_width_str`` overrides a resolution).
    zdim : int
        Channels of each latent layer.
    bottleneck_multiple : float
        Bottleneck width of every block = ``int(width * bottleneck_multiple)``.
    num_mixtures : int
        Logistic mixture components of the output distribution.
    enc_blocks, dec_blocks : str
        Block strings (see :func:`parse_layer_string`). Every decoder block is one latent layer.
    no_bias_above : int
        Learned start maps exist for decoder resolutions <= this.
    custom_width_str : str
        ``"res:width,..."`` overrides ('' for the ImageNet models).
    low_bit : bool
        5-bit likelihood bins (the original uses them only for FFHQ-256).
    pixel_mean, pixel_std : float
        Encoder input normalisation on uint8 pixel values.
    n_feature_layers : int
        Default number of leading latent layers that :meth:`VDVAE.encode` returns.
    """

    image_size: int = 64
    width: int = 512
    zdim: int = 16
    bottleneck_multiple: float = 0.25
    num_mixtures: int = 10
    enc_blocks: str = "64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5"
    dec_blocks: str = "1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12"
    no_bias_above: int = 64
    custom_width_str: str = ""
    low_bit: bool = False
    pixel_mean: float = PAPER.stage1.pixel_mean
    pixel_std: float = PAPER.stage1.pixel_std
    n_feature_layers: int = PAPER.stage1.n_feature_layers

    # -- constructors ------------------------------------------------------------------------------------
    @classmethod
    def imagenet64(cls) -> "VDVAEConfig":
        """The paper's model: openai/vdvae ``hps.py`` set ``imagenet64`` (125M parameters, 75 latent layers)."""
        s1 = PAPER.stage1
        return cls(
            image_size=s1.image_size,
            width=512,
            zdim=16,
            bottleneck_multiple=0.25,
            num_mixtures=10,
            enc_blocks="64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5",
            dec_blocks="1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12",
            no_bias_above=64,
            custom_width_str="",
            pixel_mean=s1.pixel_mean,
            pixel_std=s1.pixel_std,
            n_feature_layers=s1.n_feature_layers,
        )

    @classmethod
    def tiny(cls, image_size: int = 32) -> "VDVAEConfig":
        """A small model of the same architecture for tests and the demo world (0.11M parameters at 32 px).

        ``image_size`` 32: latent layers 1 at 1x1, 2 at 4x4, 2 at 8x8, 2 at 16x16, 2 at 32x32 (zdim 4);
        ``image_size`` 64 adds 1 layer at 64x64. The default features are every layer up to a quarter of the
        image side, as the paper's 31 layers of ImageNet-64 (every layer through 16x16; its one extra layer at
        32x32 is 1 of 32 there, here it would be 1 of 2): at 32 px the first 5 layers (through 8x8),
        4 + 2*64 + 2*256 = 644 values; at 64 px the first 7 (through 16x16), 644 + 2*1024 = 2,692 values.
        """
        if image_size not in (32, 64):
            raise ValueError(f"'image_size' must be one of [32, 64]; {image_size!r} was provided")
        enc = "32x1,32d2,16x1,16d2,8x1,8d2,4x1,4d4,1x1"
        dec = "1x1,4m1,4x1,8m4,8x1,16m8,16x1,32m16,32x1"
        if image_size == 64:
            enc = "64x1,64d2," + enc
            dec = dec + ",64m32"
        return cls(
            image_size=image_size,
            width=32,
            zdim=4,
            bottleneck_multiple=0.25,
            num_mixtures=5,
            enc_blocks=enc,
            dec_blocks=dec,
            no_bias_above=64,
            n_feature_layers=5 if image_size == 32 else 7,
        )

    @classmethod
    def from_dict(cls, d: Mapping) -> "VDVAEConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VDVAE config has unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict:
        return asdict(self)

    # -- derived -----------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        enc = parse_layer_string(self.enc_blocks)
        dec = parse_layer_string(self.dec_blocks)
        if self.zdim < 1 or self.width < 1 or self.num_mixtures < 1:
            raise ValueError(
                f"'zdim', 'width', 'num_mixtures' must be >= 1; {self.zdim}, {self.width}, "
                f"{self.num_mixtures} were provided"
            )
        if enc[0][0] != self.image_size:
            raise ValueError(
                f"'enc_blocks' must start at image_size {self.image_size}; {self.enc_blocks!r} starts at {enc[0][0]}"
            )
        if dec[-1][0] != self.image_size:
            raise ValueError(
                f"'dec_blocks' must end at image_size {self.image_size}; {self.dec_blocks!r} ends at {dec[-1][0]}"
            )
        enc_res = self._encoder_resolutions(enc)
        missing = sorted({r for r, _ in dec} - enc_res)
        if missing:
            raise ValueError(
                f"'dec_blocks' uses resolutions {missing} that 'enc_blocks' never produces ({sorted(enc_res)})"
            )
        seen: set[int] = set()
        for res, mixin in dec:
            if mixin is not None and (mixin not in seen or res % mixin):
                raise ValueError(
                    f"decoder block '{res}m{mixin}' mixes in resolution {mixin}, which must come earlier and "
                    f"divide {res}; {self.dec_blocks!r} was provided"
                )
            seen.add(res)
        if int(self.width * self.bottleneck_multiple) < 1:
            raise ValueError(f"'width * bottleneck_multiple' must be >= 1; {self.width} * {self.bottleneck_multiple}")
        if not 1 <= self.n_feature_layers <= len(dec):
            raise ValueError(
                f"'n_feature_layers' must be in [1, {len(dec)}] (the decoder's latent layers); "
                f"{self.n_feature_layers} was provided"
            )

    def _encoder_resolutions(self, enc) -> set[int]:
        out = {self.image_size}
        res = self.image_size
        for r, down in enc:
            if r != res:
                raise ValueError(
                    f"'enc_blocks' item at resolution {r} follows a block that outputs {res}; "
                    f"{self.enc_blocks!r} was provided"
                )
            if down is not None:
                if res % down:
                    raise ValueError(f"'enc_blocks' downsamples {res} by {down}, which does not divide it")
                res //= down
                out.add(res)
        return out

    def width_at(self, res: int) -> int:
        """Residual-stream channels at resolution ``res``."""
        return _width_map(self.width, self.custom_width_str).get(res, self.width)

    @property
    def enc_layers(self) -> list[tuple[int, int | None]]:
        return parse_layer_string(self.enc_blocks)

    @property
    def dec_layers(self) -> list[tuple[int, int | None]]:
        return parse_layer_string(self.dec_blocks)

    @property
    def n_latent_layers(self) -> int:
        """Number of latent layers (= decoder blocks); 75 for ImageNet-64."""
        return len(self.dec_layers)

    def latent_shapes(self, n_layers: int | None = None) -> list[tuple[int, int, int]]:
        """``(zdim, res, res)`` of the first ``n_layers`` latent layers (all if None)."""
        n = self._check_n_layers(n_layers, default=self.n_latent_layers)
        return [(self.zdim, res, res) for res, _ in self.dec_layers[:n]]

    def feature_dim(self, n_layers: int | None = None) -> int:
        """Length of the concatenated flattened latents of the first ``n_layers`` layers
        (default ``n_feature_layers``; 91,168 for the paper's 31 layers)."""
        n = self._check_n_layers(n_layers, default=self.n_feature_layers)
        return int(sum(c * h * w for c, h, w in self.latent_shapes(n)))

    def _check_n_layers(self, n_layers: int | None, default: int) -> int:
        if n_layers is None:
            return default
        if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)):
            raise TypeError(f"'n_layers' must be an int or None; {n_layers!r} was provided")
        if not 1 <= int(n_layers) <= self.n_latent_layers:
            raise ValueError(
                f"'n_layers' must be in [1, {self.n_latent_layers}] for this config; {n_layers} was provided"
            )
        return int(n_layers)


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------
def _conv(in_ch: int, out_ch: int, kernel: int, zero_weights: bool = False) -> nn.Conv2d:
    """Conv2d with zero bias (and optionally zero weights), 'same' padding, as the original initialises."""
    c = nn.Conv2d(in_ch, out_ch, kernel, 1, kernel // 2)
    with torch.no_grad():
        c.bias.zero_()
        if zero_weights:
            c.weight.zero_()
    return c


def _scale_(p: torch.Tensor, factor: float) -> None:
    with torch.no_grad():
        p.mul_(factor)


class Block(nn.Module):
    """Bottleneck block: ``c1`` 1x1 -> ``c2`` 3x3 -> ``c3`` 3x3 -> ``c4`` 1x1, GELU before each conv.

    3x3 convolutions become 1x1 at resolutions <= 2. Optional residual connection, then optional
    ``down_rate``-fold average pooling. Input ``(n, in_ch, r, r)`` -> ``(n, out_ch, r', r')``.
    """

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, down_rate: int | None = None,
                 residual: bool = False, use_3x3: bool = True, zero_last: bool = False):
        super().__init__()
        self.down_rate = down_rate
        self.residual = residual
        k = 3 if use_3x3 else 1
        self.c1 = _conv(in_ch, mid_ch, 1)
        self.c2 = _conv(mid_ch, mid_ch, k)
        self.c3 = _conv(mid_ch, mid_ch, k)
        self.c4 = _conv(mid_ch, out_ch, 1, zero_weights=zero_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.gelu(x))
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        h = self.c4(F.gelu(h))
        out = x + h if self.residual else h
        if self.down_rate is not None:
            out = F.avg_pool2d(out, kernel_size=self.down_rate, stride=self.down_rate)
        return out


def _pad_channels(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    return F.pad(t, (0, 0, 0, 0, 0, width - t.shape[1]))


class Encoder(nn.Module):
    """Bottom-up encoder: normalised images ``(n, 3, S, S)`` -> ``{res: (n, width_at(res), res, res)}``."""

    def __init__(self, cfg: VDVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.in_conv = _conv(3, cfg.width, 3)
        layers = cfg.enc_layers
        blocks = []
        for res, down in layers:
            w = cfg.width_at(res)
            blocks.append(Block(w, int(w * cfg.bottleneck_multiple), w, down_rate=down, residual=True,
                                use_3x3=res > 2))
        for b in blocks:
            _scale_(b.c4.weight, math.sqrt(1.0 / len(layers)))
        self.enc_blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        x = self.in_conv(x)
        acts = {x.shape[2]: x}
        for block in self.enc_blocks:
            x = block(x)
            res = x.shape[2]
            x = _pad_channels(x, self.cfg.width_at(res))
            acts[res] = x
        return acts


class DecBlock(nn.Module):
    """One top-down latent layer at resolution ``res``.

    ``prior(x)`` gives the prior mean/log-std of ``z`` (``zdim`` channels each) and a residual update of x;
    ``enc([x, acts])`` gives the posterior mean/log-std; ``z_proj(z)`` is added to x, then ``resnet``.
    """

    def __init__(self, cfg: VDVAEConfig, res: int, mixin: int | None, n_blocks: int):
        super().__init__()
        self.base = res
        self.mixin = mixin
        self.zdim = cfg.zdim
        self.width = cfg.width_at(res)
        w = self.width
        mid = int(w * cfg.bottleneck_multiple)
        use_3x3 = res > 2
        self.enc = Block(w * 2, mid, cfg.zdim * 2, residual=False, use_3x3=use_3x3)
        self.prior = Block(w, mid, cfg.zdim * 2 + w, residual=False, use_3x3=use_3x3, zero_last=True)
        self.z_proj = _conv(cfg.zdim, w, 1)
        _scale_(self.z_proj.weight, math.sqrt(1.0 / n_blocks))
        self.resnet = Block(w, mid, w, residual=True, use_3x3=use_3x3)
        _scale_(self.resnet.c4.weight, math.sqrt(1.0 / n_blocks))

    def _input(self, xs: dict[int, torch.Tensor], n: int, ref: torch.Tensor) -> torch.Tensor:
        x = xs.get(self.base)
        if x is None:
            x = ref.new_zeros((n, self.width, self.base, self.base))
        elif x.shape[0] != n:
            x = x.expand(n, -1, -1, -1)
        if self.mixin is not None:
            up = xs[self.mixin][:, : x.shape[1]]
            x = x + F.interpolate(up, scale_factor=self.base // self.mixin)  # nearest, as the original
        return x

    def prior_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (n, w, r, r)`` -> prior mean, prior log-std ``(n, zdim, r, r)``, updated x."""
        feats = self.prior(x)
        pm, pv, xpp = feats[:, : self.zdim], feats[:, self.zdim: 2 * self.zdim], feats[:, 2 * self.zdim:]
        return pm, pv, x + xpp

    def posterior(self, x: torch.Tensor, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-std ``(n, zdim, r, r)`` from the decoder state and encoder activations."""
        qm, qv = self.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        return qm, qv

    def finish(self, x: torch.Tensor, z: torch.Tensor, xs: dict[int, torch.Tensor]) -> None:
        xs[self.base] = self.resnet(x + self.z_proj(z))


class DmolNet(nn.Module):
    """Output head: decoder map ``(n, width, S, S)`` -> mixture-of-logistics parameters ``(n, S, S, 10*K)``.

    Channel layout (as the original): ``[:K]`` mixture logits; then, per colour channel c, a block of
    3K values: means ``[:K]``, log-scales ``[K:2K]``, pre-tanh coefficients ``[2K:3K]`` (G depends on R by
    coefficient 0; B on R and G by coefficients 1 and 2).
    """

    def __init__(self, cfg: VDVAEConfig):
        super().__init__()
        self.num_mixtures = cfg.num_mixtures
        self.low_bit = cfg.low_bit
        self.out_conv = _conv(cfg.width, cfg.num_mixtures * _DMOL_PARAMS_PER_MIXTURE, 1)

    def forward(self, px_z: torch.Tensor) -> torch.Tensor:
        return self.out_conv(px_z).permute(0, 2, 3, 1)

    def _unpack(self, l: torch.Tensor):
        k = self.num_mixtures
        n, h, w, _ = l.shape
        logits = l[..., :k]
        rest = l[..., k:].reshape(n, h, w, 3, 3 * k)
        means = rest[..., :k]
        log_scales = rest[..., k: 2 * k].clamp(min=_MIN_LOG_SCALE)
        coeffs = torch.tanh(rest[..., 2 * k: 3 * k])
        return logits, means, log_scales, coeffs

    def nll(self, px_z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats per sub-pixel, ``(n,)``; ``target (n, S, S, 3)`` in [-1, 1]."""
        logits, means, log_scales, coeffs = self._unpack(self.forward(px_z))
        x = target.unsqueeze(-1)  # (n, h, w, 3, 1)
        m0 = means[..., 0, :]
        m1 = means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :]
        m2 = means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]
        centered = x - torch.stack([m0, m1, m2], dim=3)
        inv_s = torch.exp(-log_scales)
        half_bin = 1.0 / 31.0 if self.low_bit else 1.0 / 255.0
        plus_in = inv_s * (centered + half_bin)
        min_in = inv_s * (centered - half_bin)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # x at 0 (left edge)
        log_one_minus_cdf_min = -F.softplus(min_in)  # x at 255 (right edge)
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
        n_bins_half = 15.5 if self.low_bit else 127.5
        log_probs = torch.where(
            x < -0.999, log_cdf_plus,
            torch.where(x > 0.999, log_one_minus_cdf_min,
                        torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                                    log_pdf_mid - math.log(n_bins_half))))
        log_probs = log_probs.sum(dim=3) + torch.log_softmax(logits, dim=-1)
        log_px = torch.logsumexp(log_probs, dim=-1)  # (n, h, w)
        return -log_px.sum(dim=(1, 2)) / float(np.prod(target.shape[1:]))

    def sample(self, px_z: torch.Tensor, generators: "_Noise", mode: str = "sample") -> np.ndarray:
        """Images ``(n, S, S, 3)`` uint8 from the mixture, as the original ``DmolNet.sample``.

        ``mode="sample"`` (the original): component drawn by Gumbel-max, value drawn from its logistic,
        clamped to [-1, 1] channel by channel (G, B conditioned on the drawn R, G), mapped by
        ``(x + 1) * 127.5`` and truncated to uint8. ``mode="mean"``: most probable component, its means
        (no logistic noise), same mapping.
        """
        logits, means, log_scales, coeffs = self._unpack(self.forward(px_z).float())
        n, h, w, _ = logits.shape
        k = self.num_mixtures
        if mode == "sample":
            u = generators.uniform((h, w, k), logits).clamp(1e-5, 1.0 - 1e-5)
            idx = torch.argmax(logits - torch.log(-torch.log(u)), dim=-1)
        else:
            idx = torch.argmax(logits, dim=-1)
        sel = F.one_hot(idx, k).to(logits.dtype).unsqueeze(3)  # (n, h, w, 1, k)
        m = (means * sel).sum(-1)
        ls = (log_scales * sel).sum(-1)
        cf = (coeffs * sel).sum(-1)
        if mode == "sample":
            u = generators.uniform((h, w, 3), m).clamp(1e-5, 1.0 - 1e-5)
            x = m + torch.exp(ls) * (torch.log(u) - torch.log1p(-u))
        else:
            x = m
        x0 = x[..., 0].clamp(-1.0, 1.0)
        x1 = (x[..., 1] + cf[..., 0] * x0).clamp(-1.0, 1.0)
        x2 = (x[..., 2] + cf[..., 1] * x0 + cf[..., 2] * x1).clamp(-1.0, 1.0)
        img = (torch.stack([x0, x1, x2], dim=-1) + 1.0) * 127.5
        return img.clamp(0.0, 255.0).cpu().numpy().astype(np.uint8)


class Decoder(nn.Module):
    """Top-down decoder: ``dec_blocks``, ``bias_xs``, ``out_net``, ``gain``, ``bias``."""

    def __init__(self, cfg: VDVAEConfig):
        super().__init__()
        self.cfg = cfg
        layers = cfg.dec_layers
        self.dec_blocks = nn.ModuleList([DecBlock(cfg, r, m, n_blocks=len(layers)) for r, m in layers])
        self.resolutions = sorted({r for r, _ in layers})
        self.bias_xs = nn.ParameterList([
            nn.Parameter(torch.zeros(1, cfg.width_at(r), r, r)) for r in self.resolutions if r <= cfg.no_bias_above
        ])
        self.out_net = DmolNet(cfg)
        self.gain = nn.Parameter(torch.ones(1, cfg.width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, cfg.width, 1, 1))

    def start_maps(self) -> dict[int, torch.Tensor]:
        """The learned start maps ``{res: (1, width, res, res)}``."""
        return {b.shape[2]: b for b in self.bias_xs}

    def final(self, xs: dict[int, torch.Tensor]) -> torch.Tensor:
        return xs[self.cfg.image_size] * self.gain + self.bias


# ---------------------------------------------------------------------------------------------------------
# Noise with per-item generators
# ---------------------------------------------------------------------------------------------------------
class _Noise:
    """Draws noise for a batch, either from one generator (or the global RNG) for the whole batch, or from
    one generator per item so that item i's draws do not depend on the batch it is in. Draws happen on the
    CPU in float32 and are then moved to the reference tensor's device and dtype."""

    def __init__(self, n: int, generator: torch.Generator | None = None, seeds: Sequence[int] | None = None):
        self.n = n
        self.generator = generator
        self.per_item = None
        if seeds is not None:
            self.per_item = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def _draw(self, fn, shape: tuple[int, ...], ref: torch.Tensor) -> torch.Tensor:
        if self.per_item is None:
            gen = self.generator
            dev = gen.device if gen is not None else ref.device
            out = fn((self.n, *shape), generator=gen, device=dev)
        else:
            out = torch.stack([fn(shape, generator=g) for g in self.per_item])
        return out.to(device=ref.device, dtype=ref.dtype)

    def normal(self, shape: tuple[int, ...], ref: torch.Tensor) -> torch.Tensor:
        return self._draw(lambda s, generator, device=None: torch.randn(s, generator=generator, device=device),
                          shape, ref)

    def uniform(self, shape: tuple[int, ...], ref: torch.Tensor) -> torch.Tensor:
        return self._draw(lambda s, generator, device=None: torch.rand(s, generator=generator, device=device),
                          shape, ref)


def _resolve_seeds(seed, n: int, what: str) -> list[int] | None:
    if seed is None:
        return None
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return [seed_for("vdvae", what, int(seed), i) for i in range(n)]
    seeds = list(seed)
    if len(seeds) != n:
        raise ValueError(f"'seed' list must have one seed per item ({n}); {len(seeds)} were provided")
    return [int(s) for s in seeds]


def _gaussian_kl(mu1, mu2, logsigma1, logsigma2):
    """KL(N(mu1, sigma1) || N(mu2, sigma2)) elementwise, log-std parameterisation."""
    return -0.5 + logsigma2 - logsigma1 + 0.5 * (torch.exp(2 * logsigma1) + (mu1 - mu2) ** 2) * torch.exp(
        -2 * logsigma2)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
class VDVAE(nn.Module):
    """Hierarchical top-down VAE with an ``encoder`` and a ``decoder`` (checkpoint-compatible names).

    Build on the meta device to inspect shapes without allocating: ``with torch.device("meta"): VDVAE(cfg)``.
    """

    def __init__(self, config: VDVAEConfig | None = None):
        super().__init__()
        self.config = config if config is not None else VDVAEConfig.imagenet64()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    # -- shapes ------------------------------------------------------------------------------------------
    def latent_shapes(self, n_layers: int | None = None) -> list[tuple[int, int, int]]:
        """``(C, H, W)`` of the first ``n_layers`` latent layers (all layers if None)."""
        return self.config.latent_shapes(n_layers)

    def feature_dim(self, n_layers: int | None = None) -> int:
        """Feature length for the first ``n_layers`` layers (default ``config.n_feature_layers``)."""
        return self.config.feature_dim(n_layers)

    @property
    def _ref(self) -> torch.Tensor:
        return self.decoder.gain

    # -- input handling ----------------------------------------------------------------------------------
    def prepare_images(self, images) -> torch.Tensor:
        """uint8 RGB ``(n, H, W, 3)`` (numpy or tensor) -> float pixel values ``(n, 3, S, S)`` in [0, 255].

        Images not already ``S x S`` (``config.image_size``) are resized (squashed, aspect ratio not kept)
        with antialiased bilinear interpolation (``torch.nn.functional.interpolate(..., antialias=True)``,
        the same filter as PIL's BILINEAR used by the original scripts) and rounded back to integers.
        """
        if isinstance(images, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(images))
        elif isinstance(images, torch.Tensor):
            t = images.detach()
        else:
            raise TypeError(f"'images' must be a numpy array or torch tensor; {type(images).__name__} was provided")
        if t.ndim != 4 or t.shape[-1] != 3:
            raise ValueError(f"'images' must have shape (n, H, W, 3); {tuple(t.shape)} was provided")
        if t.dtype != torch.uint8:
            raise ValueError(f"'images' must be uint8 pixel values; dtype {t.dtype} was provided")
        x = t.permute(0, 3, 1, 2).to(torch.float32)
        s = self.config.image_size
        if x.shape[2] != s or x.shape[3] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            x = x.round().clamp(0.0, 255.0)
        return x.to(device=self._ref.device)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        c = self.config
        return ((pixels - c.pixel_mean) / c.pixel_std).to(self._ref.dtype)

    # -- training ----------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training losses for a batch, in nats per sub-pixel (as the original ``VAE.forward``).

        Parameters
        ----------
        images : tensor (n, S, S, 3)
            Pixel values in [0, 255] (uint8 or float), at the model's resolution.

        Returns
        -------
        dict with ``elbo`` = ``distortion`` + ``rate`` (scalars, batch means), ``distortion`` (the
        mixture-of-logistics NLL), ``rate`` (sum of per-layer KL(q || p) / (S*S*3)) and ``rate_per_layer``
        ``(n_latent_layers,)`` (each layer's KL / (S*S*3), batch mean).
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
            found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"'images' must be a tensor (n, H, W, 3); {found} was provided")
        s = self.config.image_size
        if images.shape[1] != s or images.shape[2] != s:
            raise ValueError(f"'images' must be {s}x{s} for training; {tuple(images.shape[1:3])} was provided")
        pixels = images.to(device=self._ref.device, dtype=torch.float32)
        target = (pixels / 127.5 - 1.0).to(self._ref.dtype)
        x_in = self._normalise(pixels.permute(0, 3, 1, 2))
        acts = self.encoder(x_in)
        noise = _Noise(images.shape[0], generator=generator)
        xs = dict(self.decoder.start_maps())
        n = images.shape[0]
        kls = []
        for block in self.decoder.dec_blocks:
            x = block._input(xs, n, acts[block.base])
            qm, qv = block.posterior(x, acts[block.base])
            pm, pv, x = block.prior_step(x)
            z = qm + torch.exp(qv) * noise.normal(tuple(qm.shape[1:]), qm)
            kls.append(_gaussian_kl(qm, pm, qv, pv).sum(dim=(1, 2, 3)))
            block.finish(x, z, xs)
        px_z = self.decoder.final(xs)
        distortion = self.decoder.out_net.nll(px_z, target)
        ndims = float(s * s * 3)
        kl = torch.stack(kls, dim=1) / ndims  # (n, n_layers)
        rate = kl.sum(dim=1)
        return dict(
            elbo=(distortion + rate).mean(),
            distortion=distortion.mean(),
            rate=rate.mean(),
            rate_per_layer=kl.mean(dim=0),
        )

    # -- features ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images, n_layers: int | None = None, mode: str = "sample",
               generator: torch.Generator | None = None, seed=None, batch_size: int = 32) -> torch.Tensor:
        """Posterior latents of the first ``n_layers`` latent layers, flattened and concatenated.

        Parameters
        ----------
        images : uint8 array or tensor (n, H, W, 3)
            RGB images; resized to ``config.image_size`` if needed (see :meth:`prepare_images`).
        n_layers : int, optional
            Leading latent layers to return (default ``config.n_feature_layers``: 31 for ImageNet-64).
        mode : {"sample", "mean"}
            "sample": posterior samples, as the original Brain-Diffuser scripts; "mean": posterior means.
        generator : torch.Generator, optional
            Noise source for "sample" shared by the batch (the global RNG if None and ``seed`` is None).
        seed : int or list of int, optional
            Per-item seeds instead of ``generator`` (a list: item i reproduces alone, whatever the batch).
        batch_size : int
            Images per forward pass.

        Returns
        -------
        torch.FloatTensor (n, feature_dim(n_layers)), on the CPU. Layer order as the decoder, each layer
        flattened in (C, H, W) order.
        """
        if mode not in ("sample", "mean"):
            raise ValueError(f"'mode' must be one of ['sample', 'mean']; {mode!r} was provided")
        if generator is not None and seed is not None:
            raise ValueError("give either 'generator' or 'seed', not both")
        n_layers = self.config._check_n_layers(n_layers, default=self.config.n_feature_layers)
        pixels_all = self.prepare_images(images)
        n = pixels_all.shape[0]
        seeds = _resolve_seeds(seed, n, "encode")
        out = []
        for start in range(0, n, max(1, int(batch_size))):
            stop = min(n, start + batch_size)
            noise = _Noise(stop - start, generator=generator, seeds=None if seeds is None else seeds[start:stop])
            out.append(self._encode_batch(pixels_all[start:stop], n_layers, mode, noise))
        if not out:
            return torch.zeros((0, self.feature_dim(n_layers)), dtype=torch.float32)
        return torch.cat(out, dim=0)

    def _encode_batch(self, pixels: torch.Tensor, n_layers: int, mode: str, noise: _Noise) -> torch.Tensor:
        acts = self.encoder(self._normalise(pixels))
        n = pixels.shape[0]
        xs = dict(self.decoder.start_maps())
        feats = []
        for block in self.decoder.dec_blocks[:n_layers]:
            x = block._input(xs, n, acts[block.base])
            qm, qv = block.posterior(x, acts[block.base])
            _, _, x = block.prior_step(x)
            z = qm if mode == "mean" else qm + torch.exp(qv) * noise.normal(tuple(qm.shape[1:]), qm)
            feats.append(z.reshape(n, -1).float().cpu())
            block.finish(x, z, xs)
        return torch.cat(feats, dim=1)

    def split_features(self, features, n_layers: int | None = None) -> list[torch.Tensor]:
        """``(n, feature_dim)`` -> list of ``(n, C, H, W)`` latents (n_layers inferred from the length)."""
        f = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
        if f.ndim != 2:
            raise ValueError(f"'features' must have shape (n, feature_dim); {tuple(f.shape)} was provided")
        if n_layers is None:
            n_layers = self._layers_for_dim(f.shape[1])
        elif self.feature_dim(n_layers) != f.shape[1]:
            raise ValueError(
                f"'features' has {f.shape[1]} columns but {n_layers} layers need {self.feature_dim(n_layers)}"
            )
        out, start = [], 0
        for c, h, w in self.latent_shapes(n_layers):
            out.append(f[:, start: start + c * h * w].reshape(-1, c, h, w))
            start += c * h * w
        return out

    def _layers_for_dim(self, dim: int) -> int:
        total = 0
        for i, (c, h, w) in enumerate(self.latent_shapes()):
            total += c * h * w
            if total == dim:
                return i + 1
            if total > dim:
                break
        valid = [self.feature_dim(k) for k in range(1, min(self.config.n_latent_layers, 8) + 1)]
        raise ValueError(
            f"'features' length {dim} is not the size of any number of leading latent layers "
            f"(e.g. {valid}, ...; {self.feature_dim()} for the default {self.config.n_feature_layers} layers)"
        )

    # -- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, features, temperature: float = PAPER.stage1.temperature, seed=None,
               output: str = "sample", batch_size: int = 32) -> np.ndarray:
        """Images from leading-layer latents: the given layers fixed, the rest sampled from the prior.

        Parameters
        ----------
        features : array or tensor (n, feature_dim(k))
            Concatenated latents of the first k layers (k inferred from the length; k = 31 gives 91,168
            for ImageNet-64). ``(n, 0)`` samples every layer from the prior.
        temperature : float
            Prior standard deviation multiplier for the sampled layers (1 in the paper; 0 = prior means).
        seed : None, int or list of int
            None: the global RNG. int: item i uses ``seed_for("vdvae", "decode", seed, i)``. list: one seed
            per item, so item i gives the same image alone or in any batch.
        output : {"sample", "mean"}
            "sample": draw from the mixture of logistics, as the original ``DmolNet.sample``;
            "mean": the most probable component's means (deterministic given the latents).

        Returns
        -------
        numpy uint8 array (n, S, S, 3).
        """
        if output not in ("sample", "mean"):
            raise ValueError(f"'output' must be one of ['sample', 'mean']; {output!r} was provided")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ValueError(f"'temperature' must be a number >= 0; {temperature!r} was provided")
        f = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
        if f.ndim != 2:
            raise ValueError(f"'features' must have shape (n, feature_dim); {tuple(f.shape)} was provided")
        n = f.shape[0]
        latents = self.split_features(f) if f.shape[1] else []
        seeds = _resolve_seeds(seed, n, "decode")
        s = self.config.image_size
        out = np.zeros((n, s, s, 3), dtype=np.uint8)
        bs = max(1, int(batch_size))
        for start in range(0, n, bs):
            stop = min(n, start + bs)
            noise = _Noise(stop - start, seeds=None if seeds is None else seeds[start:stop])
            lat = [z[start:stop].to(device=self._ref.device, dtype=self._ref.dtype) for z in latents]
            px_z = self._decode_maps(stop - start, lat, float(temperature), noise)
            out[start:stop] = self.decoder.out_net.sample(px_z, noise, mode=output)
        return out

    def _decode_maps(self, n: int, latents: list[torch.Tensor], t: float, noise: _Noise) -> torch.Tensor:
        xs = {r: b.expand(n, -1, -1, -1) for r, b in self.decoder.start_maps().items()}
        ref = self._ref
        for i, block in enumerate(self.decoder.dec_blocks):
            x = block._input(xs, n, ref)
            pm, pv, x = block.prior_step(x)
            if i < len(latents):
                z = latents[i]
            elif t == 0:
                z = pm
            else:
                z = pm + torch.exp(pv) * t * noise.normal(tuple(pm.shape[1:]), pm)
            block.finish(x, z, xs)
        return self.decoder.final(xs)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------
def expected_state_dict_shapes(config: VDVAEConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a :class:`VDVAE` for ``config``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = VDVAE(config if config is not None else VDVAEConfig.imagenet64())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _strip_module_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = "module."
    return {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}


def _describe_mismatch(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], config: VDVAEConfig,
                       path: Path, limit: int = 10) -> str | None:
    diff = state_mismatch({k: tuple(v.shape) for k, v in sd.items()}, expected, limit)
    if diff is None:
        return None
    return (
        f"VDVAE weights in {str(path)!r} do not match the assumed config "
        f"(width={config.width}, zdim={config.zdim}, image_size={config.image_size}, "
        f"num_mixtures={config.num_mixtures}, enc_blocks={config.enc_blocks!r}, dec_blocks={config.dec_blocks!r}, "
        f"no_bias_above={config.no_bias_above}, custom_width_str={config.custom_width_str!r}); "
        f"{diff}. Pass the matching VDVAEConfig to load_vdvae."
    )


def _config_beside(path: Path) -> VDVAEConfig | None:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if _META_KEY in meta:
            return VDVAEConfig.from_dict(json.loads(meta[_META_KEY]))
    side = path.with_suffix(".json")
    if side.is_file():
        return VDVAEConfig.from_dict(json.loads(side.read_text()))
    return None


def load_vdvae(path: str | os.PathLike, config: VDVAEConfig | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> VDVAE:
    """Load VDVAE weights: the official ``.th`` file or a ``.safetensors`` written by :func:`save_vdvae`.

    Parameters
    ----------
    path : path
        ``imagenet64-iter-1600000-model-ema.th`` (read with ``torch.load(weights_only=True)``; keys with or
        without a DDP ``module.`` prefix) or ``*.safetensors``.
    config : VDVAEConfig, optional
        Architecture. If None: the config stored in the safetensors file or a JSON beside it, else
        :meth:`VDVAEConfig.imagenet64`.
    device, dtype
        Where and in which float type the returned model lives (float32 default; float16 for GPUs).

    Returns
    -------
    VDVAE in eval mode.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (the message says where to download the paper's checkpoint).
    ValueError
        If the file's keys or shapes do not match the config (lists missing/unexpected keys and shapes).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"VDVAE checkpoint not found at {str(path.resolve())!r}. The paper's weights are "
            f"{PAPER.stage1.checkpoint_name!r} (about 0.5 GB) from the openai/vdvae release: {CHECKPOINT_URL} ; "
            "download it and pass its path (Brain-Diffuser keeps it as vdvae/model/"
            f"{PAPER.stage1.checkpoint_name})."
        )
    if config is None:
        config = _config_beside(path) or VDVAEConfig.imagenet64()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise ValueError(
                f"could not read {str(path)!r} as a weights-only torch checkpoint (a state dict of tensors): {e}"
            ) from e
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{str(path)!r} must hold a state dict of tensors; found {type(sd).__name__}")
    sd = _strip_module_prefix(sd)
    with torch.device("meta"):
        model = VDVAE(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    msg = _describe_mismatch(sd, expected, config, path)
    if msg:
        raise ValueError(msg)
    sd = {k: v.to(dtype=dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def save_vdvae(model: VDVAE, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights to ``path`` (``.safetensors``, config in its metadata) and the config as
    JSON beside it (``path`` with suffix ``.json``). Both writes are atomic. Returns ``path``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"'path' must end with '.safetensors'; {str(path)!r} was provided")
    if not isinstance(model, VDVAE):
        raise TypeError(f"'model' must be a VDVAE; {type(model).__name__} was provided")
    from safetensors.torch import save_file

    cfg = model.config.to_dict()
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={_META_KEY: json.dumps(cfg, sort_keys=True)})
    atomic_write_json(path.with_suffix(".json"), cfg)
    return path
