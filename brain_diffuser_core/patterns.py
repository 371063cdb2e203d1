"""Synthetic fMRI patterns: the training stimuli that drive a pattern most, and patterns uploaded as NIfTI volumes.

* :func:`top_driving_images` ranks a subject's training images by their z-scored response averaged inside a
  pattern (the weighted mean response in the pattern's ROIs), the data-driven counterpart of the ROI-optimal
  scenes that the decoders generate from the same pattern.
* :func:`pattern_from_nifti` reads a 3-D (or single-volume 4-D) NIfTI image in the subject's func1pt8mm space
  and samples it at the subject's nsdgeneral voxels.
* :func:`pattern_to_json` / :func:`pattern_from_json`: ROI-weight patterns saved and loaded as JSON (the ROI
  designer's files, read back by the app and by the ``sweep`` command).
"""
from __future__ import annotations

import gzip
import io
import json
from typing import Mapping, Sequence

import numpy as np

MAX_NIFTI_BYTES = 256 * 2**20  # uncompressed; func1pt8mm float64 volumes are about 6 MB
PATTERN_FORMAT = "brain-diffuser-explorer/roi-pattern"
PATTERN_VERSION = 1


def top_driving_images(train_fmri: np.ndarray, train_image_ids: np.ndarray, pattern: np.ndarray,
                       k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The k training images whose response, projected on ``pattern``, is largest.

    Parameters
    ----------
    train_fmri : float (n_train, n_voxels)
        z-scored responses (``Subject.train_fmri``: standard deviations of each voxel's training betas).
    train_image_ids : int (n_train,)
        0-based 73k ids row-aligned with ``train_fmri`` (``Subject.train_image_ids``).
    pattern : float (n_voxels,)
        Voxel weights (e.g. ``Subject.synthetic_pattern``); at least one non-zero, all finite.
    k : int >= 1
        How many images; fewer (``n_train``) are returned when the subject has fewer training images.

    Returns
    -------
    image_ids : int64 (min(k, n_train),)
        73k ids, best first (ties: the earlier training row first).
    scores : float32 (min(k, n_train),)
        ``train_fmri @ pattern / sum(|pattern|)``, in z units: the weighted mean response inside the pattern.
    """
    fmri = np.asarray(train_fmri)
    ids = np.asarray(train_image_ids)
    pat = np.asarray(pattern)
    if fmri.ndim != 2:
        raise ValueError(f"'train_fmri' must have shape (n_train, n_voxels); shape {fmri.shape} was provided")
    n_train, n_voxels = fmri.shape
    if n_train == 0:
        raise ValueError("'train_fmri' must hold at least one training image; it has 0 rows")
    if ids.shape != (n_train,) or ids.dtype.kind not in "iu":
        raise ValueError(f"'train_image_ids' must be integers of shape ({n_train},) (one per row of train_fmri); "
                         f"{ids.dtype} of shape {ids.shape} was provided")
    if pat.shape != (n_voxels,):
        raise ValueError(f"'pattern' must have shape ({n_voxels},) (one weight per voxel of train_fmri); "
                         f"shape {pat.shape} was provided")
    if pat.dtype.kind not in "biuf":
        raise ValueError(f"'pattern' must be numeric (bool, int or float); its dtype is {pat.dtype}")
    n_bad = int(np.size(pat) - np.isfinite(pat).sum())
    if n_bad:
        raise ValueError(f"'pattern' must hold finite numbers; it has {n_bad} NaN/inf values")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"'k' must be an integer >= 1; {k!r} was provided")
    weights = pat.astype(np.float64)
    total = float(np.abs(weights).sum())
    if total == 0.0:
        raise ValueError(f"'pattern' must have at least one non-zero weight; all {n_voxels} weights are 0")
    scores = (fmri.astype(np.float64, copy=False) @ weights) / total
    order = np.argsort(-scores, kind="stable")[: min(int(k), n_train)]
    return ids[order].astype(np.int64), scores[order].astype(np.float32)


def _nifti_image(data: bytes, max_bytes: int):
    import nibabel as nib

    if len(data) >= 2 and data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                raw = f.read(max_bytes + 1)
        except (OSError, EOFError) as err:
            raise ValueError(f"the file starts like gzip (.nii.gz) but could not be decompressed ({err})") from None
    else:
        raw = bytes(data)
    if len(raw) > max_bytes:
        raise ValueError(f"the NIfTI image must be at most {max_bytes / 2**20:.0f} MiB uncompressed; it is larger")
    errors = []
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return cls.from_bytes(raw)
        except Exception as err:  # nibabel raises several types (HeaderDataError, ValueError, ...)
            errors.append(f"{cls.__name__}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    raise ValueError("the file must be a NIfTI-1/2 single-file image (.nii or .nii.gz); it could not be read "
                     f"as one ({'; '.join(errors)})")


def pattern_from_nifti(data: bytes, voxel_ijk: np.ndarray, volume_shape: Sequence[int],
                       affine: np.ndarray | None = None, *, max_bytes: int = MAX_NIFTI_BYTES,
                       atol_mm: float = 1e-3) -> np.ndarray:
    """A voxel pattern from an uploaded NIfTI volume in the subject's func1pt8mm space.

    Parameters
    ----------
    data : bytes
        A ``.nii`` file, or a ``.nii.gz`` file (detected by the gzip magic bytes 0x1f 0x8b).
    voxel_ijk : int (n_voxels, 3)
        Volume indices of the subject's voxels (``Subject.voxel_ijk``).
    volume_shape : 3 ints (X, Y, Z)
        The subject's volume shape (``Subject.volume_shape``); the image must have exactly this shape, or
        (X, Y, Z, 1).
    affine : float (4, 4) or None
        The subject's voxel-to-mm affine (``Subject.affine``); when given, the image's affine must match it
        within ``atol_mm`` millimetres per entry.

    Returns
    -------
    float32 (n_voxels,)
        The volume's values at ``voxel_ijk``. Raises ValueError naming what was expected and what was found
        (unreadable file, shape, affine, non-numeric or non-finite values at the subject's voxels).
    """
    shape = tuple(int(s) for s in volume_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"'volume_shape' must be 3 positive ints (X, Y, Z); {tuple(volume_shape)} was provided")
    ijk = np.asarray(voxel_ijk)
    if ijk.ndim != 2 or ijk.shape[1] != 3 or ijk.dtype.kind not in "iu":
        raise ValueError(f"'voxel_ijk' must be integers of shape (n_voxels, 3); {ijk.dtype} of shape {ijk.shape} "
                         "was provided")
    if ijk.size and (ijk.min() < 0 or np.any(ijk.max(axis=0) >= np.array(shape))):
        raise ValueError(f"'voxel_ijk' must lie inside the volume {shape}; indices range from {ijk.min(axis=0).tolist()}"
                         f" to {ijk.max(axis=0).tolist()}")
    img = _nifti_image(data, max_bytes)
    img_shape = tuple(int(s) for s in img.shape)
    if img_shape != shape and img_shape != shape + (1,):
        raise ValueError(f"the volume must have the subject's func1pt8mm shape {shape} (or {shape + (1,)}, one "
                         f"volume); shape {img_shape} was provided")
    if affine is not None:
        want = np.asarray(affine, dtype=np.float64)
        if want.shape != (4, 4):
            raise ValueError(f"'affine' must have shape (4, 4); shape {want.shape} was provided")
        got = np.asarray(img.affine, dtype=np.float64)
        if not np.allclose(got, want, rtol=0.0, atol=atol_mm):
            raise ValueError("the volume's affine must match the subject's func1pt8mm affine (same voxel grid); "
                             f"expected {np.round(want, 3).tolist()}, found {np.round(got, 3).tolist()}")
    try:
        vol = np.asanyarray(img.dataobj)
    except Exception as err:
        raise ValueError(f"the volume's data could not be read ({err})") from None
    if vol.dtype.kind not in "biuf":
        raise ValueError(f"the volume must be numeric (bool, int or float); its dtype is {vol.dtype}")
    vol = vol.reshape(shape)
    values = vol[ijk[:, 0], ijk[:, 1], ijk[:, 2]].astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        first = ijk[np.flatnonzero(bad)[0]].tolist()
        raise ValueError(f"the volume must hold finite numbers at the subject's voxels; {int(bad.sum())} of "
                         f"{values.size} are NaN/inf (first at voxel ijk {first})")
    return values.astype(np.float32)


def pattern_to_json(name: str, weights: Mapping[str, float], hemisphere: str = "both") -> str:
    """Serialise an ROI-weight pattern: {"format", "version", "name", "weights": {roi: w}, "hemisphere"}."""
    from .surface import HEMISPHERES

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
    from .surface import HEMISPHERES

    hemi = obj.get("hemisphere", "both")
    if hemi not in HEMISPHERES:
        raise ValueError(f"'hemisphere' must be one of {list(HEMISPHERES)}; {hemi!r} was found")
    return {"name": str(obj.get("name", "pattern")), "weights": out, "hemisphere": hemi}
