"""Display and file helpers shared by the pages (no streamlit here: plain functions, unit-tested).

* :func:`png_bytes`: uint8 image -> PNG for downloads.
* :func:`parse_pattern_npy`: an uploaded voxel vector, validated (size, numeric, length, finite).
* :func:`pattern_to_json` / :func:`pattern_from_json`: ROI-weight patterns saved and loaded as JSON.

The surface science (hemispheres, the voxel -> fsaverage5 map, ROI outlines) lives in
:mod:`brain_diffuser_core.nsd_surface` and the plotly surface, flat and voxel figures in
:mod:`brain_diffuser_core.surface`; its names are re-exported here for the pages.
"""
from __future__ import annotations

import io
import json
from typing import Mapping

import numpy as np

from brain_diffuser_core.export import png_bytes  # noqa: F401  (re-exported for the pages)
from brain_diffuser_core.surface import (  # noqa: F401  (re-exported for the pages and their tests)
    HEMISPHERES, flat_figure, outline_vertices, restrict_to_hemisphere, surface_figure, voxel_figure)

#: largest accepted .npy upload (a float64 NSD subject vector is about 126 KB)
MAX_NPY_BYTES = 8 * 1024 * 1024
PATTERN_FORMAT = "brain-diffuser-explorer/roi-pattern"
PATTERN_VERSION = 1


def parse_pattern_npy(data: bytes, n_voxels: int, *, max_bytes: int = MAX_NPY_BYTES) -> np.ndarray:
    """Validate an uploaded ``.npy`` voxel vector; returns float32 (n_voxels,).

    Accepts shape (n_voxels,) or (1, n_voxels) of a real numeric dtype (bool, int, float). Raises ValueError
    naming what was expected and what was found for over-size files, files that are not ``.npy`` (or need
    pickle), non-numeric dtypes, wrong lengths and NaN/inf values.
    """
    if len(data) > max_bytes:
        raise ValueError(f"the .npy file must be at most {max_bytes / 2**20:.0f} MiB; it is {len(data) / 2**20:.1f} MiB")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"the file must be a NumPy .npy array of numbers (saved with np.save, no pickle); "
                         f"it could not be read as one ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"the file must hold one array (.npy), not {type(arr).__name__}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"the array must be numeric (bool, int or float); its dtype is {arr.dtype}")
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or arr.shape[0] != int(n_voxels):
        raise ValueError(f"the array must have one value per voxel of the subject, shape ({int(n_voxels)},); "
                         f"shape {arr.shape} was provided")
    arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"the array must hold finite numbers; it has {int(bad.sum())} NaN/inf values "
                         f"(first at index {int(np.flatnonzero(bad)[0])})")
    return arr


def pattern_to_json(name: str, weights: Mapping[str, float], hemisphere: str = "both") -> str:
    """Serialise an ROI-weight pattern: {"format", "version", "name", "weights": {roi: w}, "hemisphere"}."""
    if hemisphere not in HEMISPHERES:
        raise ValueError(f"'hemisphere' must be one of {list(HEMISPHERES)}; {hemisphere!r} was provided")
    return json.dumps({"format": PATTERN_FORMAT, "version": PATTERN_VERSION, "name": str(name),
                       "weights": {str(k): float(v) for k, v in weights.items()}, "hemisphere": hemisphere},
                      indent=2)


def pattern_from_json(text: str | bytes, known_rois) -> dict:
    """Parse a pattern file written by :func:`pattern_to_json`; returns {"name", "weights", "hemisphere"}.

    Raises ValueError for invalid JSON, another format, unknown ROI names or non-finite weights.
    """
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"the pattern file must be JSON; it could not be parsed ({err})") from None
    if not isinstance(obj, dict) or obj.get("format") != PATTERN_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"the pattern file must have \"format\": {PATTERN_FORMAT!r}; {found!r} was found")
    weights = obj.get("weights")
    if not isinstance(weights, dict):
        raise ValueError(f"'weights' must map ROI names to numbers; {type(weights).__name__} was found")
    known = list(known_rois)
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"'weights' names ROIs {unknown} that are not in the catalogue {known}")
    out = {}
    for k, v in weights.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ValueError(f"weight of ROI {k!r} must be a finite number; {v!r} was found")
        out[k] = float(v)
    hemi = obj.get("hemisphere", "both")
    if hemi not in HEMISPHERES:
        raise ValueError(f"'hemisphere' must be one of {list(HEMISPHERES)}; {hemi!r} was found")
    return {"name": str(obj.get("name", "pattern")), "weights": out, "hemisphere": hemi}
