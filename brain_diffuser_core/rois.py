"""ROI catalogue: which NSD label file and label values make each region, its group and display colour.

One table, :data:`ROI_CATALOGUE`, holds every ROI the project knows:

- ``early``: the paper's V1, V2, V3, V4 from ``prf-visualrois`` (V1 = V1v+V1d = labels {1, 2}, V2 = {3, 4},
  V3 = {5, 6}, V4 = hV4 = {7}). The public Brain-Diffuser scripts built these from ``floc-faces`` by mistake;
  here they come from the retinotopy file, as the paper describes.
- ``category``: faces, words, places, bodies: every label > 0 of ``floc-<category>``.
- ``fine``: each single NSD label by its NSD name (V1v ... hV4, OFA, FFA-1, ...).
- ``eccentricity``: the five ``prf-eccrois`` bands.

Every mask is intersected with nsdgeneral: masks are boolean vectors over the subject's nsdgeneral voxels.
:func:`roi_mask_from_volumes` is the functional core; :class:`brain_diffuser_core.nsd.Subject` and the
MiniNSD world call it with their own volume loaders.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np

__all__ = [
    "RoiSpec",
    "UnknownRoiError",
    "ROI_CATALOGUE",
    "ROI_GROUPS",
    "ROI_FILES",
    "PAPER_ROIS",
    "PAPER_PRESETS",
    "roi_spec",
    "roi_names",
    "roi_mask_from_volumes",
    "synthetic_pattern_from_masks",
]


class UnknownRoiError(KeyError, ValueError):
    """An ROI name that is not in :data:`ROI_CATALOGUE` (a KeyError for lookups, a ValueError for the CLI)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class RoiSpec:
    """One ROI: the NSD label file (``roi/<file>.nii.gz``), the label values it takes (None = every label
    > 0), its catalogue group and a display colour (hex)."""

    name: str
    file: str
    labels: tuple[int, ...] | None
    group: str
    colour: str
    description: str


ROI_GROUPS: tuple[str, ...] = ("early", "category", "fine", "eccentricity")

# name, file, labels, group, colour, description
_TABLE: tuple[tuple, ...] = (
    ("V1", "prf-visualrois", (1, 2), "early", "#1f77b4", "primary visual cortex (V1v + V1d)"),
    ("V2", "prf-visualrois", (3, 4), "early", "#2ca02c", "V2 (V2v + V2d)"),
    ("V3", "prf-visualrois", (5, 6), "early", "#9467bd", "V3 (V3v + V3d)"),
    ("V4", "prf-visualrois", (7,), "early", "#17becf", "hV4"),
    ("faces", "floc-faces", None, "category", "#d62728", "face-selective: OFA, FFA-1/2, mTL-, aTL-faces"),
    ("words", "floc-words", None, "category", "#ff7f0e", "word-selective: OWFA, VWFA-1/2, mfs-, mTL-words"),
    ("places", "floc-places", None, "category", "#8c564b", "place-selective: OPA, PPA, RSC"),
    ("bodies", "floc-bodies", None, "category", "#e377c2", "body-selective: EBA, FBA-1/2, mTL-bodies"),
    ("V1v", "prf-visualrois", (1,), "fine", "#aec7e8", "V1 ventral"),
    ("V1d", "prf-visualrois", (2,), "fine", "#1f77b4", "V1 dorsal"),
    ("V2v", "prf-visualrois", (3,), "fine", "#98df8a", "V2 ventral"),
    ("V2d", "prf-visualrois", (4,), "fine", "#2ca02c", "V2 dorsal"),
    ("V3v", "prf-visualrois", (5,), "fine", "#c5b0d5", "V3 ventral"),
    ("V3d", "prf-visualrois", (6,), "fine", "#9467bd", "V3 dorsal"),
    ("hV4", "prf-visualrois", (7,), "fine", "#17becf", "human V4"),
    ("OFA", "floc-faces", (1,), "fine", "#ff9896", "occipital face area"),
    ("FFA-1", "floc-faces", (2,), "fine", "#d62728", "fusiform face area 1"),
    ("FFA-2", "floc-faces", (3,), "fine", "#b22222", "fusiform face area 2"),
    ("mTL-faces", "floc-faces", (4,), "fine", "#8b0000", "mid temporal lobe faces"),
    ("aTL-faces", "floc-faces", (5,), "fine", "#ff6347", "anterior temporal lobe faces"),
    ("EBA", "floc-bodies", (1,), "fine", "#f7b6d2", "extrastriate body area"),
    ("FBA-1", "floc-bodies", (2,), "fine", "#e377c2", "fusiform body area 1"),
    ("FBA-2", "floc-bodies", (3,), "fine", "#c71585", "fusiform body area 2"),
    ("mTL-bodies", "floc-bodies", (4,), "fine", "#8b008b", "mid temporal lobe bodies"),
    ("OPA", "floc-places", (1,), "fine", "#c49c94", "occipital place area"),
    ("PPA", "floc-places", (2,), "fine", "#8c564b", "parahippocampal place area"),
    ("RSC", "floc-places", (3,), "fine", "#5c3a2e", "retrosplenial cortex"),
    ("OWFA", "floc-words", (1,), "fine", "#ffbb78", "occipital word form area"),
    ("VWFA-1", "floc-words", (2,), "fine", "#ff7f0e", "visual word form area 1"),
    ("VWFA-2", "floc-words", (3,), "fine", "#e6550d", "visual word form area 2"),
    ("mfs-words", "floc-words", (4,), "fine", "#a63603", "mid fusiform sulcus words"),
    ("mTL-words", "floc-words", (5,), "fine", "#7f2704", "mid temporal lobe words"),
    ("ecc0pt5", "prf-eccrois", (1,), "eccentricity", "#fde725", "eccentricity 0-0.5 deg"),
    ("ecc1", "prf-eccrois", (2,), "eccentricity", "#5ec962", "eccentricity 0.5-1 deg"),
    ("ecc2", "prf-eccrois", (3,), "eccentricity", "#21918c", "eccentricity 1-2 deg"),
    ("ecc4", "prf-eccrois", (4,), "eccentricity", "#3b528b", "eccentricity 2-4 deg"),
    ("ecc4+", "prf-eccrois", (5,), "eccentricity", "#440154", "eccentricity > 4 deg"),
)

#: name -> :class:`RoiSpec`, in catalogue order
ROI_CATALOGUE: Mapping[str, RoiSpec] = MappingProxyType({row[0]: RoiSpec(*row) for row in _TABLE})

#: every NSD label file the catalogue reads (``roi/<file>.nii.gz``)
ROI_FILES: tuple[str, ...] = tuple(dict.fromkeys(spec.file for spec in ROI_CATALOGUE.values()))

#: the paper's eight ROIs (Fig. 5-7)
PAPER_ROIS: tuple[str, ...] = ("V1", "V2", "V3", "V4", "faces", "words", "places", "bodies")


def _paper_presets() -> dict[str, dict[str, float]]:
    presets: dict[str, dict[str, float]] = {name: {name: 1.0} for name in PAPER_ROIS}
    early = {name: 1.0 for name in ("V1", "V2", "V3", "V4")}
    presets["V1-V4"] = dict(early)
    for cat in ("faces", "words", "places", "bodies"):
        presets[f"V1-V4+{cat}"] = {**early, cat: 1.0}
    for band in ("ecc0pt5", "ecc1", "ecc2", "ecc4", "ecc4+"):  # the paper's eccentricity figure
        presets[band] = {band: 1.0}
    return presets


#: synthetic-fMRI presets for the paper's figures: each ROI alone, V1-V4, V1-V4 plus one category ROI, and
#: each eccentricity band alone
PAPER_PRESETS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {k: MappingProxyType(v) for k, v in _paper_presets().items()}
)


def roi_spec(name: str) -> RoiSpec:
    """The catalogue entry for ``name``; unknown names raise :class:`UnknownRoiError` listing the catalogue."""
    try:
        return ROI_CATALOGUE[name]
    except KeyError:
        raise UnknownRoiError(f"unknown ROI {name!r}; the catalogue has {list(ROI_CATALOGUE)}") from None


def roi_names(group: str | None = None) -> list[str]:
    """ROI names in catalogue order, optionally only one of :data:`ROI_GROUPS`."""
    if group is None:
        return list(ROI_CATALOGUE)
    if group not in ROI_GROUPS:
        raise ValueError(f"'group' must be one of {list(ROI_GROUPS)}; {group!r} was provided")
    return [name for name, spec in ROI_CATALOGUE.items() if spec.group == group]


def roi_mask_from_volumes(
    name: str,
    load_label_volume: Callable[[str], np.ndarray],
    nsdgeneral_ijk: np.ndarray,
) -> np.ndarray:
    """Boolean mask over the nsdgeneral voxels for one catalogue ROI.

    Parameters
    ----------
    name : str
        A key of :data:`ROI_CATALOGUE`.
    load_label_volume : callable
        ``load_label_volume(file_stem) -> int array (X, Y, Z)`` for a file such as ``"prf-visualrois"``;
        it raises FileNotFoundError when the file does not exist.
    nsdgeneral_ijk : int array (n_voxels, 3)
        Volume indices of the nsdgeneral voxels (in the subject's voxel order).

    Returns
    -------
    bool array (n_voxels,): True where the voxel carries one of the ROI's labels.
    """
    spec = roi_spec(name)
    volume = np.asarray(load_label_volume(spec.file))
    ijk = np.asarray(nsdgeneral_ijk)
    if ijk.ndim != 2 or ijk.shape[1] != 3:
        raise ValueError(f"'nsdgeneral_ijk' must have shape (n_voxels, 3); {ijk.shape} was provided")
    if volume.ndim != 3 or (ijk.size and np.any(ijk.max(axis=0) >= volume.shape)):
        raise ValueError(
            f"ROI file {spec.file!r} has shape {volume.shape}, which does not contain the nsdgeneral voxels "
            f"(max index {tuple(ijk.max(axis=0)) if ijk.size else ()})"
        )
    values = volume[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    if spec.labels is None:
        return values > 0
    return np.isin(values, np.asarray(spec.labels))


def synthetic_pattern_from_masks(
    weights: Mapping[str, float], roi_mask: Callable[[str], np.ndarray], n_voxels: int
) -> np.ndarray:
    """Synthetic fMRI (n_voxels,) float32: ``weight`` inside each ROI, 0 elsewhere; overlapping ROIs add.

    Not z-scored (the paper feeds the 0/1 pattern straight to the decoders).
    """
    if not weights:
        raise ValueError("'weights' must name at least one ROI, e.g. {'V1': 1.0}; an empty mapping was provided")
    pattern = np.zeros(int(n_voxels), dtype=np.float32)
    for name, weight in weights.items():
        mask = np.asarray(roi_mask(name), dtype=bool)
        if mask.shape != pattern.shape:
            raise ValueError(f"mask of ROI {name!r} has shape {mask.shape}; expected {pattern.shape}")
        pattern[mask] += np.float32(weight)
    return pattern
