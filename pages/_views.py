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

import numpy as np

from brain_diffuser_core.export import png_bytes  # noqa: F401  (re-exported for the pages)
from brain_diffuser_core.patterns import (  # noqa: F401  (re-exported for the pages; the sweep CLI reads them too)
    PATTERN_FORMAT, PATTERN_VERSION, pattern_from_json, pattern_to_json)
from brain_diffuser_core.surface import (  # noqa: F401  (re-exported for the pages and their tests)
    HEMISPHERES, flat_figure, outline_vertices, restrict_to_hemisphere, surface_figure, voxel_figure)

#: largest accepted .npy upload (a float64 NSD subject vector is about 126 KB)
MAX_NPY_BYTES = 8 * 1024 * 1024


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
