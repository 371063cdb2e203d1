"""Real NSD data -> :class:`Subject` (averaged, z-scored fMRI per image, image ids, stimuli, captions, ROIs).

:func:`load_subject` follows Brain-Diffuser (see ``PAPER.md``):

1. trial ``i`` (0-based over the subject's sessions, 750 per session) shows the 73k image
   ``subjectim[subject-1, masterordering[i]-1] - 1``; it is a test trial when ``masterordering[i] <= 1000``;
2. betas are read inside nsdgeneral (label > 0) and divided by 300;
3. repeats of one image are averaged (train and test);
4. every voxel is z-scored with the TRAIN images' mean and std (ddof=1); the same statistics are applied to
   the test images. Results are float32.

Sessions are streamed one at a time (and each session in blocks of 50 trials): per-image sums of the raw
int16 betas are accumulated in int32 and overwritten in place by the float32 averages, so memory stays near
``n_images x n_voxels x 4`` bytes: 0.93 GB peak RSS measured for a full-shape subject (37 sessions, 15,724
voxels; ``benchmarks/nsd_prepare_memory.py``). Results are cached under
``cache_dir or config.cache_root()/"nsd"`` keyed by subject, sessions and the input files' sizes and mtimes.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from . import rois as _rois
from .config import PAPER, cache_root
from .io import atomic_dir
from .nsd_format import COCO_SPLITS, NSDPaths

__all__ = ["Subject", "NSDFormatError", "load_subject", "mask_checksum", "parse_sessions"]

#: bump when the cached arrays' meaning changes
_CACHE_VERSION = 1
#: trials read at once from one session file (~1.3 MB a trial for a full volume)
_BLOCK_TRIALS = 50
_BETAS_FORMATS = ("auto", "nii.gz", "hdf5")


class NSDFormatError(ValueError):
    """An NSD file exists but does not hold what NSD puts there (shape, dtype, NaNs, unreadable)."""


def mask_checksum(volume_shape: Sequence[int], voxel_ijk: np.ndarray) -> str:
    """sha256 (hex) identifying a voxel set: the volume shape and the (n_voxels, 3) indices in order.

    Two arrays of fMRI can be used with the same decoders only if their checksums agree.
    """
    ijk = np.ascontiguousarray(np.asarray(voxel_ijk, dtype=np.int64))
    if ijk.ndim != 2 or ijk.shape[1] != 3:
        raise ValueError(f"'voxel_ijk' must have shape (n_voxels, 3); {ijk.shape} was provided")
    h = hashlib.sha256()
    h.update(json.dumps([int(s) for s in volume_shape]).encode())
    h.update(ijk.astype("<i8").tobytes())
    return h.hexdigest()


def parse_sessions(text: str) -> list[int]:
    """Parse ``"1-37"``, ``"1,3,5-7"`` or ``"4"`` into a sorted list of session numbers."""
    out: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"'sessions' must look like '1-37' or '1,3,5-7'; {text!r} was provided")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if a < 1 or b < a:
            raise ValueError(f"'sessions' range {part!r} must be increasing and start at 1 or more")
        out.update(range(a, b + 1))
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------
# low-level readers
# ----------------------------------------------------------------------------------------------------------
def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: expected {path}")
    return path


def _read_expdesign(path: Path) -> dict[str, np.ndarray]:
    import scipy.io

    _require(path, "NSD experiment design")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as err:  # scipy raises several types for corrupt files
        raise NSDFormatError(f"{path}: not a readable MATLAB file ({err})") from err
    out = {}
    for key, n in (("masterordering", 40 * PAPER.nsd.trials_per_session), ("subjectim", None), ("sharedix", None)):
        if key not in mat:
            raise NSDFormatError(f"{path}: expected variable {key!r}; found {sorted(k for k in mat if not k.startswith('__'))}")
        out[key] = np.asarray(mat[key]).astype(np.int64)
    mo = out["masterordering"].reshape(-1)
    if mo.size < PAPER.nsd.trials_per_session:
        raise NSDFormatError(f"{path}: 'masterordering' must hold one entry per trial (30000); found {mo.size}")
    out["masterordering"] = mo
    if out["subjectim"].ndim != 2:
        raise NSDFormatError(f"{path}: 'subjectim' must be 2-D (8, 10000); found {out['subjectim'].shape}")
    return out


def _load_label_nifti(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(int array (X, Y, Z), affine (4, 4)) of an NSD label volume."""
    import nibabel as nib

    _require(path, what)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise NSDFormatError(f"{path}: not a readable NIfTI label volume ({err})") from err
    if data.ndim != 3:
        raise NSDFormatError(f"{path}: expected a 3-D label volume (X, Y, Z); found shape {data.shape}")
    data = np.nan_to_num(np.asarray(data, dtype=np.float64), nan=-1.0)
    return np.rint(data).astype(np.int32), np.asarray(img.affine, dtype=np.float64)


def _session_file(paths: NSDPaths, session: int, betas_format: str) -> Path | None:
    nii, h5 = paths.betas_nifti(session), paths.betas_hdf5(session)
    if betas_format == "nii.gz":
        return nii if nii.is_file() else None
    if betas_format == "hdf5":
        return h5 if h5.is_file() else None
    # auto: the HDF5 reads without gzip decompression; fall back to NIfTI
    if h5.is_file():
        return h5
    return nii if nii.is_file() else None


def _iter_betas_blocks(path: Path, volume_shape: tuple[int, int, int], block: int) -> Iterator[np.ndarray]:
    """Yield the betas of one session in blocks of trials, each shaped (n, Z, Y, X) (C order).

    NIfTI files are read as one sequential stream (F-ordered (X, Y, Z, T) on disk is C-ordered
    (T, Z, Y, X)); HDF5 files are sliced along their first axis. Raises :class:`NSDFormatError` for shapes
    other than (X, Y, Z, 750) / (750, Z, Y, X) or unreadable files.
    """
    n_trials = PAPER.nsd.trials_per_session
    x, y, z = volume_shape
    if path.name.endswith(".hdf5"):
        import h5py

        try:
            f = h5py.File(path, "r")
        except Exception as err:
            raise NSDFormatError(
                f"{path}: not a readable HDF5 file (expected dataset 'betas' of shape "
                f"({n_trials}, {z}, {y}, {x}) int16): {err}"
            ) from err
        with f:
            if "betas" not in f:
                raise NSDFormatError(f"{path}: expected dataset 'betas'; found {list(f.keys())}")
            dset = f["betas"]
            if dset.shape != (n_trials, z, y, x):
                raise NSDFormatError(
                    f"{path}: dataset 'betas' must have shape ({n_trials}, {z}, {y}, {x}) (trials, Z, Y, X) to "
                    f"match nsdgeneral's volume {volume_shape}; found {dset.shape}"
                )
            for t0 in range(0, n_trials, block):
                try:
                    yield dset[t0 : t0 + block]
                except OSError as err:
                    raise NSDFormatError(f"{path}: could not read trials {t0}..{t0 + block}: {err}") from err
        return

    import nibabel as nib

    try:
        img = nib.load(str(path))
        proxy = img.dataobj  # ArrayProxy: where and how the data lie in the file
        shape = tuple(int(s) for s in img.shape)
        dtype = np.dtype(proxy.dtype)
        offset = int(proxy.offset)
        slope, inter = float(proxy.slope), float(proxy.inter)
        order = getattr(proxy, "order", "F")
    except Exception as err:
        raise NSDFormatError(f"{path}: not a readable NIfTI file ({err})") from err
    if shape != (x, y, z, n_trials):
        raise NSDFormatError(
            f"{path}: betas must have shape ({x}, {y}, {z}, {n_trials}) (nsdgeneral's volume x {n_trials} "
            f"trials); found {shape}"
        )
    if order != "F":
        raise NSDFormatError(f"{path}: expected Fortran-ordered NIfTI data; found order {order!r}")
    scale = not (np.isnan(slope) or slope in (0.0, 1.0))
    shift = not (np.isnan(inter) or inter == 0.0)
    vol_bytes = x * y * z * dtype.itemsize
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            f.seek(offset)
            for t0 in range(0, n_trials, block):
                n = min(block, n_trials - t0)
                buf = f.read(n * vol_bytes)
                if len(buf) != n * vol_bytes:
                    raise NSDFormatError(f"{path}: file ends early (trial {t0 + len(buf) // vol_bytes} of {n_trials})")
                arr = np.frombuffer(buf, dtype=dtype).reshape(n, z, y, x)
                if scale or shift:
                    arr = arr.astype(np.float64) * (slope if scale else 1.0) + (inter if shift else 0.0)
                yield arr
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise NSDFormatError(f"{path}: could not read betas ({err})") from err


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [path.name, int(st.st_size), int(st.st_mtime_ns)]


# ----------------------------------------------------------------------------------------------------------
# Subject
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Prepared:
    train_fmri: np.ndarray
    test_fmri: np.ndarray
    train_image_ids: np.ndarray
    test_image_ids: np.ndarray
    fmri_mean: np.ndarray
    fmri_std: np.ndarray


class Subject:
    """One NSD subject, prepared for Brain-Diffuser.

    Attributes
    ----------
    subject : int
    nsd_root : Path
    train_fmri, test_fmri : float32 (n_images, n_voxels)
        Per-image averaged betas/300, z-scored per voxel with the train statistics.
    train_image_ids, test_image_ids : int64 (n_images,)
        Sorted 0-based 73k ids, row-aligned with the fMRI arrays.
    voxel_ijk : int64 (n_voxels, 3)
        Volume indices of the nsdgeneral voxels, in C order of the volume.
    volume_shape : tuple (X, Y, Z)
    affine : float64 (4, 4)
    fmri_mean, fmri_std : float32 (n_voxels,)
        Train statistics in betas/300 units: ``(raw / 300 - fmri_mean) / fmri_std`` normalises new betas.
    mask_sha256 : str
        :func:`mask_checksum` of (volume_shape, voxel_ijk).
    sessions_used : tuple of int
    cache_path : Path or None
        Folder holding the cached arrays.
    loaded_from_cache : bool
    """

    def __init__(
        self,
        *,
        subject: int,
        nsd_root: Path,
        prepared: _Prepared,
        voxel_ijk: np.ndarray,
        volume_shape: tuple[int, int, int],
        affine: np.ndarray,
        sessions_used: Sequence[int],
        cache_path: Path | None = None,
        loaded_from_cache: bool = False,
    ) -> None:
        self.subject = int(subject)
        self.nsd_root = Path(nsd_root)
        self.paths = NSDPaths(self.nsd_root, self.subject)
        self.train_fmri = prepared.train_fmri
        self.test_fmri = prepared.test_fmri
        self.train_image_ids = prepared.train_image_ids
        self.test_image_ids = prepared.test_image_ids
        self.fmri_mean = prepared.fmri_mean
        self.fmri_std = prepared.fmri_std
        self.voxel_ijk = np.asarray(voxel_ijk, dtype=np.int64)
        self.volume_shape = tuple(int(s) for s in volume_shape)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.mask_sha256 = mask_checksum(self.volume_shape, self.voxel_ijk)
        self.sessions_used = tuple(int(s) for s in sessions_used)
        self.cache_path = cache_path
        self.loaded_from_cache = bool(loaded_from_cache)
        self._label_volumes: dict[str, np.ndarray] = {}
        self._captions_index: dict[int, list[str]] | None = None

    def __repr__(self) -> str:
        return (
            f"Subject(subject={self.subject}, sessions={len(self.sessions_used)}, train={len(self.train_image_ids)}, "
            f"test={len(self.test_image_ids)}, voxels={self.n_voxels})"
        )

    @property
    def n_voxels(self) -> int:
        return int(self.voxel_ijk.shape[0])

    # -- stimuli ---------------------------------------------------------------------------------------
    def _check_image_id(self, image_id) -> int:
        i = int(image_id)
        if not 0 <= i < PAPER.nsd.n_stimuli:
            raise ValueError(f"'image_id' must be a 0-based 73k id in [0, {PAPER.nsd.n_stimuli}); {image_id} was provided")
        return i

    def image(self, image_id: int) -> np.ndarray:
        """The stimulus ``image_id`` (0-based 73k id) as uint8 (S, S, 3), read alone from the HDF5.

        ``imgBrick`` may hold square images of any side S: NSD's is (73000, 425, 425, 3); the MiniNSD world
        stores its 64 px scenes as they are, (73000, 64, 64, 3). Callers that need a fixed size resize.
        """
        import h5py

        i = self._check_image_id(image_id)
        path = _require(self.paths.stimuli, "NSD stimuli file")
        try:
            with h5py.File(path, "r") as f:
                dset = f["imgBrick"]
                shape = dset.shape
                if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or shape[0] <= i:
                    size = PAPER.nsd.stimulus_size
                    raise NSDFormatError(
                        f"{path}: 'imgBrick' must have shape (n_images > {i}, S, S, 3) with square images "
                        f"(NSD: ({PAPER.nsd.n_stimuli}, {size}, {size}, 3)); found {shape}"
                    )
                if dset.dtype != np.uint8:
                    raise NSDFormatError(f"{path}: 'imgBrick' must hold uint8 pixels; found {dset.dtype}")
                # a subset copy (`download nsd --stimuli subset`) marks the images it holds; the others read as zeros
                absent = "present" in f and not bool(f["present"][i])
                image = None if absent else np.asarray(dset[i], dtype=np.uint8)
        except (OSError, KeyError) as err:
            raise NSDFormatError(f"{path}: could not read image {i} from dataset 'imgBrick' ({err})") from err
        if absent:
            raise FileNotFoundError(
                f"{path}: image {i} is not in this subset copy of the stimuli (its 'present' flag is False: no "
                f"downloaded session of any subject showed it). Fetch it with `python -m brain_diffuser_core "
                f"download nsd --subject {self.subject} --out {self.nsd_root} --sessions ...` naming the sessions "
                "that show it, or --stimuli full")
        return image

    def captions(self, image_id: int) -> list[str]:
        """Non-empty COCO captions of ``image_id``, from a curated .npy or from the stim-info CSV + COCO json.

        Raises FileNotFoundError listing every place looked at when neither source exists.
        """
        i = self._check_image_id(image_id)
        for candidate in self.paths.captions_npy_candidates:
            if candidate.is_file():
                arr = np.load(candidate, mmap_mode="r", allow_pickle=False)
                if arr.ndim != 2 or arr.shape[0] <= i:
                    raise NSDFormatError(f"{candidate}: expected a (73000, 5) caption array; found {arr.shape}")
                return [str(c).strip() for c in arr[i] if str(c).strip()]
        jsons = [self.paths.coco_captions_json(s) for s in COCO_SPLITS]
        csv_path = self.paths.stim_info_csv
        if csv_path.is_file() and any(p.is_file() for p in jsons):
            if self._captions_index is None:
                self._captions_index = _build_coco_index(csv_path, jsons)
            return list(self._captions_index.get(i, []))
        looked = [str(p) for p in self.paths.captions_npy_candidates] + [f"{csv_path} + {jsons[0].name}/{jsons[1].name} in {jsons[0].parent}"]
        raise FileNotFoundError("no captions found; looked for: " + "; ".join(looked))

    # -- ROIs ------------------------------------------------------------------------------------------
    def _label_volume(self, file_stem: str) -> np.ndarray:
        if file_stem not in self._label_volumes:
            path = self.paths.roi_file(file_stem)
            if not path.is_file():
                raise FileNotFoundError(
                    f"ROI file {path} does not exist; available ROIs for subject {self.subject}: {self.roi_names()}"
                )
            vol, _ = _load_label_nifti(path, "ROI file")
            if vol.shape != self.volume_shape:
                raise NSDFormatError(f"{path}: expected volume shape {self.volume_shape}; found {vol.shape}")
            self._label_volumes[file_stem] = vol
        return self._label_volumes[file_stem]

    def roi_names(self, group: str | None = None) -> list[str]:
        """Catalogue ROIs whose label file exists for this subject."""
        return [n for n in _rois.roi_names(group) if self.paths.roi_file(_rois.ROI_CATALOGUE[n].file).is_file()]

    def roi_mask(self, name: str) -> np.ndarray:
        """bool (n_voxels,): nsdgeneral voxels inside catalogue ROI ``name``."""
        return _rois.roi_mask_from_volumes(name, self._label_volume, self.voxel_ijk)

    def synthetic_pattern(self, weights: Mapping[str, float]) -> np.ndarray:
        """float32 (n_voxels,): each weight inside its ROI, 0 elsewhere, overlapping ROIs add; not z-scored."""
        return _rois.synthetic_pattern_from_masks(weights, self.roi_mask, self.n_voxels)


def _build_coco_index(csv_path: Path, jsons: Sequence[Path]) -> dict[int, list[str]]:
    import csv

    by_coco: dict[int, list[str]] = {}
    for path in jsons:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            for ann in data["annotations"]:
                cap = str(ann["caption"]).strip()
                if cap:
                    by_coco.setdefault(int(ann["image_id"]), []).append(cap)
        except (ValueError, KeyError, TypeError) as err:
            raise NSDFormatError(f"{path}: expected COCO captions JSON with 'annotations' [{{image_id, caption}}] ({err})") from err
    out: dict[int, list[str]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "cocoId" not in reader.fieldnames:
            raise NSDFormatError(f"{csv_path}: expected a 'cocoId' column; found {reader.fieldnames}")
        for row_index, row in enumerate(reader):
            nsd_id = int(row["nsdId"]) if row.get("nsdId") not in (None, "") else row_index
            caps = by_coco.get(int(row["cocoId"]))
            if caps:
                out[nsd_id] = caps
    return out


# ----------------------------------------------------------------------------------------------------------
# load_subject
# ----------------------------------------------------------------------------------------------------------
_ARRAYS = ("train_fmri", "test_fmri", "train_image_ids", "test_image_ids", "fmri_mean", "fmri_std")


def load_subject(
    nsd_root,
    subject: int,
    *,
    sessions: Sequence[int] | str | None = None,
    cache_dir=None,
    progress: bool = True,
    betas_format: str = "auto",
    on_session: Callable[[int, int], None] | None = None,
) -> Subject:
    """Prepare (or read from cache) one NSD subject for Brain-Diffuser.

    Parameters
    ----------
    nsd_root : path
        NSD root folder (holding ``nsddata``, ``nsddata_betas``, ``nsddata_stimuli``).
    subject : int
        1..8 (the paper uses 1, 2, 5, 7).
    sessions : list of int, str like ``"1-37"``, or None
        Sessions to read; None = every session 1..37 whose betas file exists. Named sessions must exist.
    cache_dir : path, optional
        Default ``config.cache_root() / "nsd"``.
    progress : bool
        Show a tqdm bar over sessions.
    betas_format : {"auto", "nii.gz", "hdf5"}
        "auto" prefers ``.hdf5`` and falls back to ``.nii.gz`` per session.
    on_session : callable(done, total), optional
        Called after each session (for app progress bars).

    Returns
    -------
    Subject
    """
    # 1. Check inputs
    if betas_format not in _BETAS_FORMATS:
        raise ValueError(f"'betas_format' must be one of {list(_BETAS_FORMATS)}; {betas_format!r} was provided")
    nsd_root = Path(nsd_root)
    if not nsd_root.is_dir():
        raise FileNotFoundError(f"NSD root folder not found: {nsd_root}")
    paths = NSDPaths(nsd_root, subject)
    if isinstance(sessions, str):
        sessions = parse_sessions(sessions)

    # 2. Find the session files
    if sessions is None:
        candidates = range(1, PAPER.nsd.n_sessions + 1)
        files = {s: f for s in candidates if (f := _session_file(paths, s, betas_format)) is not None}
        if not files:
            raise FileNotFoundError(
                f"subject {subject} has no betas sessions: looked for betas_sessionNN.nii.gz/.hdf5 "
                f"(NN = 01..{PAPER.nsd.n_sessions}) in {paths.betas_dir}"
            )
    else:
        files = {}
        for s in sorted({int(s) for s in sessions}):
            f = _session_file(paths, s, betas_format)
            if f is None:
                ext = {"auto": ".hdf5 or .nii.gz", "nii.gz": ".nii.gz", "hdf5": ".hdf5"}[betas_format]
                raise FileNotFoundError(
                    f"betas for session {s} not found: expected {paths.betas_dir / f'betas_session{s:02d}'}{ext}"
                )
            files[s] = f
        if not files:
            raise ValueError("'sessions' must name at least one session; an empty list was provided")

    # 3. Mask and design
    mask_vol, affine = _load_label_nifti(paths.nsdgeneral, "nsdgeneral mask")
    expdesign = _read_expdesign(paths.expdesign)
    mask = mask_vol > 0
    voxel_ijk = np.argwhere(mask).astype(np.int64)  # C order of the volume
    if voxel_ijk.shape[0] == 0:
        raise NSDFormatError(f"{paths.nsdgeneral}: no voxel has a label > 0")
    volume_shape = tuple(int(s) for s in mask.shape)

    # 4. Cache lookup
    key_inputs = {
        "version": _CACHE_VERSION,
        "nsd_root": str(nsd_root.resolve()),
        "subject": int(subject),
        "sessions": sorted(files),
        "betas": [_file_stamp(files[s]) for s in sorted(files)],
        "expdesign": _file_stamp(paths.expdesign),
        "nsdgeneral": _file_stamp(paths.nsdgeneral),
    }
    key = hashlib.sha256(json.dumps(key_inputs, sort_keys=True).encode()).hexdigest()[:20]
    cache_base = Path(cache_dir) if cache_dir is not None else cache_root() / "nsd"
    cache_path = cache_base / f"{paths.subj}-{key}"
    common = dict(
        subject=subject, nsd_root=nsd_root, voxel_ijk=voxel_ijk, volume_shape=volume_shape, affine=affine,
        sessions_used=sorted(files), cache_path=cache_path,
    )
    cached = _read_cache(cache_path, voxel_ijk)
    if cached is not None:
        return Subject(prepared=cached, loaded_from_cache=True, **common)

    # 5. Stream sessions, accumulate per-image sums, average, z-score
    prepared = _prepare(paths, files, expdesign, voxel_ijk, volume_shape, progress, on_session)

    # 6. Write the cache atomically
    with atomic_dir(cache_path) as tmp:
        for name in _ARRAYS:
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, getattr(prepared, name), allow_pickle=False)
        with open(tmp / "voxel_ijk.npy", "wb") as f:
            np.save(f, voxel_ijk, allow_pickle=False)
        meta = dict(key_inputs, mask_sha256=mask_checksum(volume_shape, voxel_ijk), volume_shape=list(volume_shape),
                    affine=affine.tolist())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Subject(prepared=prepared, loaded_from_cache=False, **common)


def _read_cache(cache_path: Path, voxel_ijk: np.ndarray) -> _Prepared | None:
    if not (cache_path / "meta.json").is_file():
        return None
    try:
        ijk = np.load(cache_path / "voxel_ijk.npy", allow_pickle=False)
        if not np.array_equal(ijk, voxel_ijk):
            return None
        arrays = {name: np.load(cache_path / f"{name}.npy", allow_pickle=False) for name in _ARRAYS}
    except (OSError, ValueError):
        return None  # damaged cache: recompute (and atomically replace it)
    return _Prepared(**arrays)


def _trial_design(expdesign: dict, subject: int, sessions: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trial index (n,), 73k id (n,), is_test (n,)) for every trial of ``sessions``."""
    tps = PAPER.nsd.trials_per_session
    mo = expdesign["masterordering"]
    subjectim = expdesign["subjectim"]
    if not 1 <= subject <= subjectim.shape[0]:
        raise NSDFormatError(f"nsd_expdesign.mat: 'subjectim' has {subjectim.shape[0]} rows; subject {subject} has none")
    trials = np.concatenate([np.arange((s - 1) * tps, s * tps) for s in sessions])
    if trials.max() >= mo.size:
        raise NSDFormatError(f"nsd_expdesign.mat: 'masterordering' has {mo.size} trials; session {max(sessions)} needs {trials.max() + 1}")
    order = mo[trials]
    image_ids = subjectim[subject - 1, order - 1] - 1
    is_test = order <= PAPER.nsd.shared_cutoff
    return trials, image_ids.astype(np.int64), is_test


def _prepare(paths, files, expdesign, voxel_ijk, volume_shape, progress, on_session) -> _Prepared:
    from tqdm.auto import tqdm

    sessions = sorted(files)
    tps = PAPER.nsd.trials_per_session
    _, trial_ids, trial_test = _trial_design(expdesign, paths.subject, sessions)
    uniq, inverse = np.unique(trial_ids, return_inverse=True)
    counts = np.bincount(inverse, minlength=uniq.size)
    # an id is test if its trials are shared-1000 trials (NSD is consistent; we still check)
    test_flags = np.zeros(uniq.size, dtype=bool)
    test_flags[inverse[trial_test]] = True
    if np.any(np.bincount(inverse[~trial_test], minlength=uniq.size)[test_flags] > 0):
        raise NSDFormatError(f"{paths.expdesign}: an image appears both as shared (test) and subject-specific (train)")
    # rows: train images first, then test, each by id, so train/test are views of one array (no copies)
    order = np.lexsort((uniq, test_flags))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    uniq, counts, test_flags, inverse = uniq[order], counts[order], test_flags[order], rank[inverse]
    n_train = int(np.count_nonzero(~test_flags))

    n_vox = voxel_ijk.shape[0]
    sums: np.ndarray | None = None
    k, j, i = voxel_ijk[:, 2], voxel_ijk[:, 1], voxel_ijk[:, 0]
    bar = tqdm(total=len(sessions), desc=f"{paths.subj} sessions", unit="session", disable=not progress)
    try:
        for done, s in enumerate(sessions, start=1):
            path = files[s]
            pos = (done - 1) * tps  # first trial of this session among the used trials
            t0 = 0
            for blk in _iter_betas_blocks(path, volume_shape, _BLOCK_TRIALS):
                vals = blk[:, k, j, i]  # (n, n_vox)
                if sums is None:
                    integer = np.issubdtype(vals.dtype, np.integer)
                    sums = np.zeros((uniq.size, n_vox), dtype=np.int32 if integer else np.float64)
                if not np.issubdtype(vals.dtype, np.integer):
                    if not np.all(np.isfinite(vals)):
                        bad = int(np.argwhere(~np.isfinite(vals))[0, 0]) + t0
                        raise NSDFormatError(f"{path}: NaN or infinite betas inside nsdgeneral (trial {bad} of the session); expected finite values")
                    if sums.dtype != np.float64:
                        sums = sums.astype(np.float64)
                rows = inverse[pos + t0 : pos + t0 + vals.shape[0]]
                for row, v in zip(rows, vals):  # an image may repeat inside a block: add trial by trial
                    sums[row] += v
                t0 += vals.shape[0]
            bar.update(1)
            if on_session is not None:
                on_session(done, len(sessions))
    finally:
        bar.close()

    # average (betas / 300) in float32, a block of rows at a time; int32 sums are overwritten in place
    # (same item size), so the sums and the averages never both occupy memory
    scale = np.float32(PAPER.nsd.beta_scale)
    if sums is None:
        raise NSDFormatError(f"no trials were read from {[str(files[s]) for s in sessions]}")
    means = sums.view(np.float32) if sums.dtype == np.int32 else np.empty((uniq.size, n_vox), np.float32)
    for r0 in range(0, uniq.size, 1024):
        r1 = min(r0 + 1024, uniq.size)
        means[r0:r1] = (sums[r0:r1] / counts[r0:r1, None]).astype(np.float32) / scale
    del sums

    train, test = means[:n_train], means[n_train:]
    if train.shape[0] < 2:
        raise NSDFormatError(
            f"sessions {sessions} of subject {paths.subject} hold {train.shape[0]} train image(s); at least 2 are "
            "needed for a standard deviation"
        )
    mean, std = _column_stats(train, PAPER.nsd.zscore_ddof)
    safe_std = np.where(std > 0, std, np.float32(1.0)).astype(np.float32)
    for arr in (train, test):
        for c0 in range(0, n_vox, 4096):
            c1 = min(c0 + 4096, n_vox)
            arr[:, c0:c1] -= mean[c0:c1]
            arr[:, c0:c1] /= safe_std[c0:c1]
    return _Prepared(
        train_fmri=train, test_fmri=test,
        train_image_ids=uniq[:n_train].astype(np.int64), test_image_ids=uniq[n_train:].astype(np.int64),
        fmri_mean=mean, fmri_std=safe_std,
    )


def _column_stats(x: np.ndarray, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std (float64 arithmetic in column blocks, float32 results)."""
    n_vox = x.shape[1]
    mean = np.empty(n_vox, dtype=np.float32)
    std = np.empty(n_vox, dtype=np.float32)
    for c0 in range(0, n_vox, 1024):
        c1 = min(c0 + 1024, n_vox)
        block = x[:, c0:c1].astype(np.float64)
        mean[c0:c1] = block.mean(axis=0)
        std[c0:c1] = block.std(axis=0, ddof=ddof)
    return mean, std
