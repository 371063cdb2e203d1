"""NSD subjects on fsaverage5 through NSD's own transforms: the voxel -> vertex map, hemispheres, ROI outlines.

Data only (no plotting: :mod:`brain_diffuser_core.surface` draws). The math is NSD's (``nsdcode``'s
``nsd_mapdata`` for func1pt8mm -> layerB1..3 -> fsaverage), rewritten in numpy/scipy:

1. ``white-to-fsaverage.mgz`` gives, for each fsaverage vertex, its nearest native vertex (1-based). fsaverage5
   is exactly the first 10,242 fsaverage vertices, so rows ``0..10241`` serve nilearn's bundled fsaverage5.
2. ``func1pt8-to-layerB{1,2,3}.mgz`` give, for each native vertex, 1-based (i, j, k) coordinates into the
   func1pt8mm array as nibabel returns it (warp-aware: the func affine is nominal), 9999 = no data.
3. Each fsaverage5 vertex samples its native vertex's three coordinates trilinearly over the MASKED voxels
   (corners outside the volume or outside nsdgeneral are dropped, not zero-filled) and averages the depths:
   one sparse row of weights per vertex, ``W_h`` float32 (10242, n_voxels), coverage ``cov_h = W_h.sum(1)``
   in [0, 1]. A pattern's surface value is ``(W_h @ p) / cov_h`` where ``cov_h >= 0.5``, else no value (NaN).

Both worlds use this one path: the MiniNSD builder writes the same files (:mod:`brain_diffuser_core.world.build`).
Maps are cached under ``cache_root()/surface`` keyed by the voxel mask checksum and the files' sizes and mtimes.
Hemispheres come from ``roi/{lh,rh}.nsdgeneral.nii.gz`` (the sign of x in the nominal affine is no left/right
rule). ROI outlines come from ``freesurfer/subjXX/label/{lh,rh}.<file>.mgz`` when present, else from the voxel
ROI masks through the same map.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .config import cache_root
from .io import atomic_path
from .nsd import NSDFormatError, _file_stamp, mask_checksum
from .nsd_format import FSAVERAGE_N_VERTICES, INVALID_COORD, LAYERS, NSD_HEMIS, NSDPaths
from .rois import roi_spec

__all__ = [
    "FSAVERAGE5_N_VERTICES",
    "MIN_COVERAGE",
    "KNOWN_MESHES",
    "TRANSFORMS_GIVE",
    "SurfaceMap",
    "transform_files",
    "missing_transform_files",
    "build_surface_map",
    "load_surface_map",
    "hemispheres_from_nsdgeneral",
    "roi_outlines",
    "read_surface_pattern",
    "surface_patterns_from_uploads",
]

#: vertices per hemisphere of fsaverage5 (the first 10,242 of fsaverage, fsaverage6 and fsaverage7)
FSAVERAGE5_N_VERTICES = 10242
#: least coverage (sum of a vertex's weights, 0..1) for a vertex to get a value
MIN_COVERAGE = 0.5
#: vertex counts of FreeSurfer's icosahedral meshes, for the wrong-mesh message of surface uploads
KNOWN_MESHES = {642: "fsaverage3", 2562: "fsaverage4", 10242: "fsaverage5", 40962: "fsaverage6",
                163842: "fsaverage (fsaverage7)"}
#: meshes whose first 10,242 vertices are fsaverage5 (accepted for surface uploads)
_NESTED_MESHES = (10242, 40962, 163842)
#: what the transform files give (the pages' fallback message names the missing ones and this)
TRANSFORMS_GIVE = ("NSD's per-vertex sampling coordinates at three cortical depths (func1pt8-to-layerB1..3, with "
                   "the functional-to-anatomical warp built in) and the native -> fsaverage nearest-neighbour "
                   "index (white-to-fsaverage): together they place each voxel on the fsaverage5 surface")
#: bump when the cached arrays' meaning changes
_CACHE_VERSION = 1
_HEMIS = tuple(NSD_HEMIS)  # ("left", "right")


# ------------------------------------------------------------------------------------------------- files
def transform_files(paths: NSDPaths) -> dict[str, dict[str, Path]]:
    """{"left"/"right": {"layerB1", "layerB2", "layerB3", "white-to-fsaverage": Path}} of a subject."""
    out = {}
    for hemi, h in NSD_HEMIS.items():
        files = {layer: paths.layer_coords(h, layer) for layer in LAYERS}
        files["white-to-fsaverage"] = paths.white_to_fsaverage(h)
        out[hemi] = files
    return out


def missing_transform_files(paths: NSDPaths) -> list[Path]:
    """The transform files of :func:`transform_files` that do not exist ([] when the surface map can be built)."""
    return [p for files in transform_files(paths).values() for p in files.values() if not p.is_file()]


def _load_mgh(path: Path) -> np.ndarray:
    """float64 array of an MGH/MGZ file as nibabel returns it (shape kept); NSDFormatError when unreadable."""
    import nibabel as nib

    try:
        return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64))
    except Exception as err:  # nibabel raises several types for damaged files
        raise NSDFormatError(f"{path}: not a readable FreeSurfer MGH file ({type(err).__name__}: {err})") from None


# ------------------------------------------------------------------------------------------------- the map
@dataclass(frozen=True)
class SurfaceMap:
    """The voxel -> fsaverage5 map of one subject (both hemispheres).

    weights : {"left"/"right": scipy.sparse.csr_matrix float32 (10242, n_voxels)}: trilinear weights / 3 per depth.
    coverage : {"left"/"right": float32 (10242,)} row sums of ``weights`` (1 = fully inside the mask at all depths).
    native_index : {"left"/"right": int64 (10242,)} 0-based native vertex each fsaverage5 vertex samples.
    n_native : {"left"/"right": int} native vertices of the hemisphere (rows of the coordinate files).
    notes : warnings met while building (e.g. coordinates outside the volume), for the page to show.
    """

    weights: dict
    coverage: dict
    native_index: dict
    n_native: dict
    n_voxels: int
    notes: tuple[str, ...] = field(default=())

    def covered(self, hemi: str) -> np.ndarray:
        """bool (10242,): the vertices with coverage >= :data:`MIN_COVERAGE` (those that get a value)."""
        return self.coverage[hemi] >= MIN_COVERAGE

    def project(self, pattern: np.ndarray) -> dict[str, np.ndarray]:
        """Voxel pattern float (n_voxels,) -> {"left"/"right": float32 (10242,)}, NaN where coverage < 0.5."""
        p = np.asarray(pattern, dtype=np.float64).ravel()
        if p.shape != (self.n_voxels,):
            raise ValueError(f"the pattern must have one value per voxel ({self.n_voxels}); shape "
                             f"{np.shape(pattern)} was provided")
        out = {}
        for hemi in _HEMIS:
            cov = self.coverage[hemi].astype(np.float64)
            ok = self.covered(hemi)
            values = np.full(FSAVERAGE5_N_VERTICES, np.nan)
            values[ok] = (self.weights[hemi] @ p)[ok] / cov[ok]
            out[hemi] = values.astype(np.float32)
        return out

    def voxel_roi_on_surface(self, voxel_mask: np.ndarray) -> dict[str, np.ndarray]:
        """{"left"/"right": bool (10242,)}: covered vertices whose sampled voxels are mostly (> 0.5) in the ROI."""
        values = self.project(np.asarray(voxel_mask, dtype=np.float64))
        return {h: np.nan_to_num(v, nan=0.0) > 0.5 for h, v in values.items()}


def _hemisphere_weights(files: Mapping[str, Path], pos: np.ndarray, volume_shape: tuple[int, int, int],
                        n_voxels: int):
    """(csr (10242, n_voxels) float32, native_index int64 (10242,), n_native, notes) of one hemisphere."""
    import scipy.sparse as sp

    w2f_path = files["white-to-fsaverage"]
    w2f = _load_mgh(w2f_path).ravel()
    if w2f.shape != (FSAVERAGE_N_VERTICES,):
        raise NSDFormatError(f"{w2f_path}: must have one row per fsaverage vertex ({FSAVERAGE_N_VERTICES:,}); "
                             f"it has {w2f.size:,}. Use NSD's white-to-fsaverage.mgz of this subject.")
    head = w2f[:FSAVERAGE5_N_VERTICES]
    if not np.all(np.isfinite(head)):
        raise NSDFormatError(f"{w2f_path}: rows 1..{FSAVERAGE5_N_VERTICES} must hold native vertex indices; "
                             f"{int((~np.isfinite(head)).sum())} are NaN/inf")
    native = np.rint(head).astype(np.int64) - 1
    coords = {}
    for layer in LAYERS:
        arr = _load_mgh(files[layer])
        if arr.ndim != 4 or arr.shape[1:] != (1, 1, 3):
            raise NSDFormatError(f"{files[layer]}: must have shape (n_vertices, 1, 1, 3) (1-based i, j, k per native "
                                 f"vertex); shape {arr.shape} was found")
        coords[layer] = arr.reshape(-1, 3)
    n_native = {layer: len(c) for layer, c in coords.items()}
    if len(set(n_native.values())) != 1:
        raise NSDFormatError(f"the three depth files must have the same rows (native vertices); found {n_native} "
                             f"in {files[LAYERS[0]].parent}")
    n_nat = n_native[LAYERS[0]]
    if native.min() < 0 or native.max() >= n_nat:
        raise NSDFormatError(f"{w2f_path}: indices must be 1-based native vertices in 1..{n_nat:,} (the rows of "
                             f"{files[LAYERS[0]].name}); found {native.min() + 1}..{native.max() + 1}. The index "
                             "file and the depth files must come from the same subject.")
    dims = np.asarray(volume_shape)
    rows, cols, vals, notes = [], [], [], []
    vertex = np.arange(FSAVERAGE5_N_VERTICES)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    for layer in LAYERS:
        raw = coords[layer][native]  # (10242, 3) 1-based
        marked = np.any(raw == INVALID_COORD, axis=1) | ~np.all(np.isfinite(raw), axis=1)
        c = np.where(marked[:, None], 0.0, raw - 1.0)
        inside = ~marked & np.all((c >= 0) & (c <= dims - 1), axis=1)
        outside = ~marked & ~inside
        if outside.any():
            bad = np.flatnonzero(outside)[0]
            notes.append(f"{files[layer].name}: {int(outside.sum())} of {FSAVERAGE5_N_VERTICES} sampled coordinates "
                         f"lie outside the func1pt8mm volume {tuple(volume_shape)} (1-based 1..{tuple(dims)}), e.g. "
                         f"{tuple(np.round(raw[bad], 2))} for fsaverage5 vertex {int(bad)}: those vertices get no "
                         "value from this depth. Check that the transforms belong to this subject.")
        ok = inside
        f = np.floor(c).astype(np.int64)
        frac = c - f
        for d in corners:
            idx = f + d
            w = np.prod(np.where(d == 1, frac, 1.0 - frac), axis=1)
            keep = ok & (w > 0) & np.all(idx < dims, axis=1)
            vox = np.full(len(keep), -1)
            vox[keep] = pos[tuple(idx[keep].T)]
            keep &= vox >= 0  # corner outside nsdgeneral: dropped (masked sampling, no zero-filling)
            rows.append(vertex[keep])
            cols.append(vox[keep])
            vals.append(w[keep] / len(LAYERS))
    W = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(FSAVERAGE5_N_VERTICES, n_voxels), dtype=np.float64)
    W.sum_duplicates()
    return W.astype(np.float32), native, int(n_nat), notes


def build_surface_map(paths: NSDPaths, voxel_ijk: np.ndarray, volume_shape: Sequence[int]) -> SurfaceMap:
    """Build the voxel -> fsaverage5 map of ``paths.subject`` from its transform files (no cache).

    voxel_ijk : int (n_voxels, 3), the subject's nsdgeneral voxels in its voxel order; volume_shape : (X, Y, Z).
    Raises FileNotFoundError naming the missing files, NSDFormatError for files of the wrong shape or range.
    """
    missing = missing_transform_files(paths)
    if missing:
        raise FileNotFoundError(f"subject {paths.subject} has no surface transforms: missing "
                                f"{', '.join(str(p) for p in missing)}. They give {TRANSFORMS_GIVE}.")
    ijk = np.asarray(voxel_ijk, dtype=np.int64)
    shape = tuple(int(s) for s in volume_shape)
    if ijk.ndim != 2 or ijk.shape[1] != 3:
        raise ValueError(f"'voxel_ijk' must have shape (n_voxels, 3); shape {ijk.shape} was provided")
    pos = np.full(shape, -1, np.int64)
    pos[tuple(ijk.T)] = np.arange(len(ijk))
    weights, coverage, native, n_native, notes = {}, {}, {}, {}, []
    for hemi, files in transform_files(paths).items():
        W, nat, n_nat, hemi_notes = _hemisphere_weights(files, pos, shape, len(ijk))
        weights[hemi], native[hemi], n_native[hemi] = W, nat, n_nat
        coverage[hemi] = np.asarray(W.sum(axis=1), dtype=np.float32).ravel()
        notes.extend(hemi_notes)
    return SurfaceMap(weights=weights, coverage=coverage, native_index=native, n_native=n_native,
                      n_voxels=len(ijk), notes=tuple(notes))


def _cache_key(paths: NSDPaths, voxel_ijk: np.ndarray, volume_shape: Sequence[int]) -> str:
    stamps = [_file_stamp(p) for files in transform_files(paths).values() for p in files.values()]
    blob = json.dumps({"version": _CACHE_VERSION, "mask": mask_checksum(volume_shape, voxel_ijk), "files": stamps})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_surface_map(paths: NSDPaths, voxel_ijk: np.ndarray, volume_shape: Sequence[int],
                     cache_dir: str | Path | None = None) -> SurfaceMap:
    """:func:`build_surface_map`, cached in ``<cache_dir or cache_root()/surface>/subjXX-<key>.npz``.

    The key is the voxel mask checksum plus the 8 transform files' names, sizes and mtimes: new files or another
    mask build a new map. The npz holds plain arrays (CSR parts; read with ``allow_pickle=False``).
    """
    missing = missing_transform_files(paths)
    if missing:
        return build_surface_map(paths, voxel_ijk, volume_shape)  # raises, naming the files
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "surface"
    target = folder / f"{paths.subj}-{_cache_key(paths, voxel_ijk, volume_shape)}.npz"
    if target.is_file():
        try:
            return _read_cached(target)
        except (OSError, ValueError, KeyError):
            pass  # damaged cache: rebuild and replace it
    smap = build_surface_map(paths, voxel_ijk, volume_shape)
    arrays = {"n_voxels": np.int64(smap.n_voxels), "notes": np.array(smap.notes, dtype=str)}
    for hemi in _HEMIS:
        W = smap.weights[hemi]
        arrays.update({f"{hemi}_data": W.data, f"{hemi}_indices": W.indices.astype(np.int32),
                       f"{hemi}_indptr": W.indptr.astype(np.int64), f"{hemi}_native": smap.native_index[hemi],
                       f"{hemi}_n_native": np.int64(smap.n_native[hemi])})
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return smap


def _read_cached(path: Path) -> SurfaceMap:
    import scipy.sparse as sp

    with np.load(path, allow_pickle=False) as z:
        n_vox = int(z["n_voxels"])
        weights, coverage, native, n_native = {}, {}, {}, {}
        for hemi in _HEMIS:
            W = sp.csr_matrix((z[f"{hemi}_data"], z[f"{hemi}_indices"], z[f"{hemi}_indptr"]),
                              shape=(FSAVERAGE5_N_VERTICES, n_vox))
            weights[hemi] = W
            coverage[hemi] = np.asarray(W.sum(axis=1), dtype=np.float32).ravel()
            native[hemi] = z[f"{hemi}_native"].astype(np.int64)
            n_native[hemi] = int(z[f"{hemi}_n_native"])
        notes = tuple(str(s) for s in z["notes"])
    return SurfaceMap(weights=weights, coverage=coverage, native_index=native, n_native=n_native, n_voxels=n_vox,
                      notes=notes)


# ------------------------------------------------------------------------------------------------- hemispheres
def hemispheres_from_nsdgeneral(paths: NSDPaths, voxel_ijk: np.ndarray) -> np.ndarray:
    """str (n_voxels,) "left"/"right" from ``roi/{lh,rh}.nsdgeneral.nii.gz`` (-1 = not this hemisphere's cortex).

    A voxel is left when lh >= 0 and rh < 0, right when rh >= 0 and lh < 0. Raises FileNotFoundError when a file
    is missing and NSDFormatError when a voxel is claimed by both hemispheres or by neither.
    """
    import nibabel as nib

    ijk = np.asarray(voxel_ijk, dtype=np.int64)
    values = {}
    for hemi, h in NSD_HEMIS.items():
        path = paths.hemi_nsdgeneral(h)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: it tells which voxels lie in the {hemi} hemisphere")
        vol = np.asanyarray(nib.load(str(path)).dataobj)
        if vol.ndim != 3 or np.any(ijk.max(axis=0) >= vol.shape):
            raise NSDFormatError(f"{path}: shape {vol.shape} does not contain the subject's voxels (max index "
                                 f"{tuple(int(v) for v in ijk.max(axis=0))})")
        values[hemi] = vol[tuple(ijk.T)]
    left = (values["left"] >= 0) & (values["right"] < 0)
    right = (values["right"] >= 0) & (values["left"] < 0)
    bad = ~(left | right)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise NSDFormatError(f"{int(bad.sum())} nsdgeneral voxels are in both or neither of {paths.hemi_nsdgeneral('lh').name}"
                             f" / {paths.hemi_nsdgeneral('rh').name} (each voxel must be >= 0 in exactly one), e.g. "
                             f"voxel {tuple(int(v) for v in ijk[k])}: lh {values['left'][k]}, rh {values['right'][k]}")
    return np.where(left, "left", "right")


# ------------------------------------------------------------------------------------------------- ROI outlines
def roi_outlines(paths: NSDPaths, smap: SurfaceMap, names: Sequence[str],
                 voxel_mask: Callable[[str], np.ndarray]) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """({roi: {"left"/"right": bool (10242,)}}, notes) for catalogue ROIs.

    From the subject's surface labels ``freesurfer/subjXX/label/{lh,rh}.<file>.mgz`` (sampled at each fsaverage5
    vertex's native vertex) when both hemispheres' files exist; otherwise, or when a label file is bad (wrong
    length: a note says so), from the voxel mask ``voxel_mask(name)`` (bool (n_voxels,)) through the map.
    """
    out, notes = {}, []
    for name in names:
        spec = roi_spec(name)
        files = {hemi: paths.surface_label(h, spec.file) for hemi, h in NSD_HEMIS.items()}
        masks = None
        if all(p.is_file() for p in files.values()):
            try:
                masks = {hemi: _label_mask(files[hemi], smap, hemi, spec.labels) for hemi in _HEMIS}
            except NSDFormatError as err:
                notes.append(f"{err}; the outline of {name} is drawn from its voxels instead")
        if masks is None:
            masks = smap.voxel_roi_on_surface(voxel_mask(name))
        out[name] = masks
    return out, notes


def _label_mask(path: Path, smap: SurfaceMap, hemi: str, labels) -> np.ndarray:
    lab = _load_mgh(path).ravel()
    if lab.size != smap.n_native[hemi]:
        raise NSDFormatError(f"{path}: must have one label per native vertex of the {hemi} hemisphere "
                             f"({smap.n_native[hemi]:,}, the rows of the transform files); it has {lab.size:,}")
    sampled = np.rint(lab[smap.native_index[hemi]]).astype(np.int64)
    return sampled > 0 if labels is None else np.isin(sampled, labels)


# ------------------------------------------------------------------------------------------------- uploads
def read_surface_pattern(name: str, data: bytes) -> np.ndarray:
    """One hemisphere's surface pattern from a GIfTI (``.gii``) or FreeSurfer (``.mgz``/``.mgh``) file's bytes.

    Accepts fsaverage (163,842 vertices), fsaverage6 (40,962) or fsaverage5 (10,242): the first 10,242 values are
    fsaverage5's. Returns float32 (10242,). Raises ValueError for other meshes, unreadable files or NaN-only data.
    """
    import nibabel as nib

    lower = name.lower()
    try:
        if lower.endswith(".gii"):
            img = nib.GiftiImage.from_bytes(data)
            if not img.darrays:
                raise ValueError("the GIfTI file holds no data array")
            values = np.asarray(img.darrays[0].data, dtype=np.float64)
        elif lower.endswith((".mgz", ".mgh")):
            raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
            values = np.asarray(nib.MGHImage.from_bytes(raw).get_fdata(dtype=np.float64))
        else:
            raise ValueError("the file must be GIfTI (.gii) or FreeSurfer MGH (.mgz, .mgh)")
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    except Exception as err:  # nibabel / gzip raise many types for files that are not what they claim
        raise ValueError(f"{name}: could not be read as {'GIfTI' if lower.endswith('.gii') else 'MGH'} "
                         f"({type(err).__name__}: {err})") from None
    if values.ndim > 1 and sum(s > 1 for s in values.shape) > 1:
        raise ValueError(f"{name}: must hold one value per vertex (one map); shape {values.shape} was found")
    values = values.ravel()
    n = values.size
    if n not in _NESTED_MESHES:
        mesh = KNOWN_MESHES.get(n, "not an fsaverage mesh (a subject's native surface must be resampled first)")
        raise ValueError(f"{name}: has {n:,} vertices ({mesh}); a surface pattern must be on fsaverage (163,842 "
                         "vertices a hemisphere) or fsaverage5 (10,242) (fsaverage6, 40,962, works too)")
    out = values[:FSAVERAGE5_N_VERTICES].astype(np.float32)
    if not np.isfinite(out).any():
        raise ValueError(f"{name}: holds no finite value on the fsaverage5 vertices")
    return out


def _upload_hemisphere(name: str) -> str | None:
    """"left"/"right" from a file name (``lh.``/``rh.`` prefix, ``hemi-L``/``hemi-R``, ``.L.``/``.R.``, left/right)."""
    low = Path(name).name.lower()
    for hemi, h, letter in (("left", "lh", "l"), ("right", "rh", "r")):
        if low.startswith(h + ".") or f"hemi-{letter}" in low or f".{letter}." in low or f"_{h}" in low \
                or f".{h}." in low or hemi in low:
            return hemi
    return None


def surface_patterns_from_uploads(files: Sequence[tuple[str, bytes]]) -> dict[str, np.ndarray]:
    """{"left"/"right": float32 (10242,)} from uploaded per-hemisphere files (see :func:`read_surface_pattern`).

    The hemisphere comes from each file name (``lh.x.mgz``, ``x_hemi-L.func.gii``, ``x.L.func.gii``, ``left``...).
    Raises ValueError naming the file when its hemisphere cannot be told or two files claim one hemisphere.
    """
    out: dict[str, np.ndarray] = {}
    for name, data in files:
        hemi = _upload_hemisphere(name)
        if hemi is None:
            raise ValueError(f"{name}: the file name must say its hemisphere (lh./rh. prefix, hemi-L/hemi-R, "
                             ".L./.R., left/right)")
        if hemi in out:
            raise ValueError(f"{name}: a second file for the {hemi} hemisphere (upload one file per hemisphere)")
        out[hemi] = read_surface_pattern(name, data)
    return out
