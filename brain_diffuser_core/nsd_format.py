"""The Natural Scenes Dataset (NSD) on-disk layout in one place: reader-side paths and writers.

The reader (:mod:`brain_diffuser_core.nsd`), the test fixtures and the MiniNSD world builder all use these
helpers, so every tree they touch has the same file names, formats, shapes and label values as NSD:

===============================  ============================================================================
file                             layout
===============================  ============================================================================
``nsd_expdesign.mat``            MATLAB v5; ``masterordering`` (1, 30000), ``subjectim`` (8, 10000),
                                 ``sharedix`` (1, 1000); all 1-based integers
``betas_sessionNN.nii.gz``       NIfTI-1, int16, shape (X, Y, Z, 750), percent signal change x 300
``betas_sessionNN.hdf5``         HDF5 dataset ``betas``, int16, shape (750, Z, Y, X): the NIfTI array with its
                                 axes reversed (MATLAB writes column-major; h5py shows the reversed shape, e.g.
                                 (750, 83, 104, 81) for subject 1's (81, 104, 83) volume)
``roi/<name>.nii.gz``            NIfTI-1 int16 label volume (X, Y, Z): -1 outside the brain, 0 no label,
                                 1..n labels (see :mod:`brain_diffuser_core.rois`)
``nsd_stimuli.hdf5``             dataset ``imgBrick``, uint8, shape (73000, 425, 425, 3) (MiniNSD: 64 px)
``nsd_stim_info_merged.csv``     one row per 73k image (row order = 0-based 73k id); columns include
                                 ``cocoId``, ``cocoSplit`` (``train2017``/``val2017``) and ``nsdId``
``captions_<split>.json``        COCO annotations: ``{"annotations": [{"image_id", "id", "caption"}, ...]}``
``COCO_73k_annots_curated.npy``  (73000, 5) unicode array, one row per 73k image, "" where no caption
``roi/{lh,rh}.nsdgeneral.nii.gz`` as ``roi/<name>.nii.gz``; -1 = not this hemisphere's cortex, 0 = cortex
                                 unlabelled, 1 = in nsdgeneral
``transforms/{lh,rh}.func1pt8-   MGH (gzipped), big-endian float32, shape (V_h, 1, 1, 3): per native vertex the
to-layerB{1,2,3}.mgz``           1-based (i, j, k) into the func1pt8mm array at 25 / 50 / 75 % cortical depth;
                                 9999 = no valid data
``transforms/{lh,rh}.white-to-   MGH float32 (163842, 1, 1): per fsaverage vertex the 1-based index of the
fsaverage.mgz``                  nearest native vertex
``freesurfer/subjXX/label/       MGH float32 (V_h, 1, 1) integer labels on the native vertices (0 = none), with
{lh,rh}.<roi>.mgz``              ``<roi>.mgz.ctab`` (lines ``idx name``, first ``0 Unknown``)
===============================  ============================================================================

All writers write atomically (a temporary file renamed into place, :mod:`brain_diffuser_core.io`).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .config import PAPER
from .io import atomic_path

__all__ = [
    "NSDPaths",
    "BETAS_TYPE",
    "CAPTIONS_NPY_NAME",
    "COCO_SPLITS",
    "subject_dir_name",
    "write_expdesign",
    "write_betas_nifti",
    "write_betas_hdf5",
    "write_label_volume",
    "write_stimuli_hdf5",
    "write_captions_npy",
    "write_coco_captions",
    "write_mgh",
    "write_layer_coords",
    "write_white_to_fsaverage",
    "write_surface_label",
    "NSD_HEMIS",
    "LAYERS",
    "FSAVERAGE_N_VERTICES",
    "INVALID_COORD",
]

#: the betas version Brain-Diffuser uses (GLMsingle with fitted HRF, GLMdenoise and ridge regression)
BETAS_TYPE = "betas_fithrf_GLMdenoise_RR"
#: the curated (73000, 5) caption array used by Brain-Diffuser's scripts
CAPTIONS_NPY_NAME = "COCO_73k_annots_curated.npy"
#: the two COCO 2017 annotation splits NSD images come from
COCO_SPLITS: tuple[str, ...] = ("train2017", "val2017")
#: descriptive text of MATLAB v5 headers (116 bytes; MATLAB ignores it): no creation time, so writes are reproducible
_MAT_HEADER_TEXT = b"MATLAB 5.0 MAT-file, written by brain_diffuser_core".ljust(116, b" ")
#: NSD's hemisphere prefixes by nilearn's hemisphere names (lh = nilearn's "left"; no left-right flip)
NSD_HEMIS: dict[str, str] = {"left": "lh", "right": "rh"}
#: NSD's three cortical depths (B1 25 % near pial, B2 50 %, B3 75 % near white), sampled by func1pt8-to-layer*.mgz
LAYERS: tuple[str, ...] = ("layerB1", "layerB2", "layerB3")
#: vertices of one fsaverage hemisphere (icosahedron order 7): rows of white-to-fsaverage.mgz
FSAVERAGE_N_VERTICES = 163842
#: NSD's marker of a vertex without valid func1pt8mm coordinates
INVALID_COORD = 9999.0
#: gzip level and deflate strategy of the NIfTI writers. Level 1 (nibabel's default too) with run-length
#: matches only (``Z_RLE``) is ordinary gzip that every reader inflates to the same bytes; on a MiniNSD betas
#: session (26 MB of int16, 78 % zeros outside the brain, the rest noise-like) it took 0.12 s and gave 5.7 MB,
#: against 0.21 s and 6.4 MB for level 1's default strategy (one CPU core)
_GZIP_LEVEL = 1
_GZIP_STRATEGY = zlib.Z_RLE


def subject_dir_name(subject: int) -> str:
    """``subjXX`` for a subject number 1..8."""
    subject = int(subject)
    if not 1 <= subject <= 8:
        raise ValueError(f"'subject' must be one of 1..8 (NSD has 8 subjects); {subject} was provided")
    return f"subj{subject:02d}"


@dataclass(frozen=True)
class NSDPaths:
    """Every NSD path this project reads, for one subject under one NSD root folder.

    Parameters
    ----------
    root : path
        The NSD root (the folder holding ``nsddata``, ``nsddata_betas``, ``nsddata_stimuli``).
    subject : int
        Subject number 1..8 (Brain-Diffuser uses 1, 2, 5, 7).
    """

    root: Path
    subject: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "subject", int(self.subject))
        subject_dir_name(self.subject)  # validates

    @property
    def subj(self) -> str:
        return subject_dir_name(self.subject)

    # -- experiment design and stimuli (shared by all subjects) ------------------------------------------
    @property
    def expdesign(self) -> Path:
        return self.root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"

    @property
    def stim_info_csv(self) -> Path:
        return self.root / "nsddata" / "experiments" / "nsd" / "nsd_stim_info_merged.csv"

    @property
    def stimuli(self) -> Path:
        return self.root / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"

    @property
    def annotations_dir(self) -> Path:
        """Where the COCO ``captions_<split>.json`` files are looked for (nsd_access convention)."""
        return self.root / "nsddata_stimuli" / "stimuli" / "nsd" / "annotations"

    def coco_captions_json(self, split: str) -> Path:
        if split not in COCO_SPLITS:
            raise ValueError(f"'split' must be one of {list(COCO_SPLITS)}; {split!r} was provided")
        return self.annotations_dir / f"captions_{split}.json"

    @property
    def captions_npy_candidates(self) -> tuple[Path, ...]:
        """Places a curated (73000, 5) caption array is looked for, first found wins."""
        return (
            self.annotations_dir / CAPTIONS_NPY_NAME,
            self.root / "annots" / CAPTIONS_NPY_NAME,
            self.root / CAPTIONS_NPY_NAME,
        )

    # -- betas ---------------------------------------------------------------------------------------------
    @property
    def betas_dir(self) -> Path:
        return self.root / "nsddata_betas" / "ppdata" / self.subj / "func1pt8mm" / BETAS_TYPE

    def _session_name(self, session: int) -> str:
        session = int(session)
        if not 1 <= session <= 99:
            raise ValueError(f"'session' must be in 1..99; {session} was provided")
        return f"betas_session{session:02d}"

    def betas_nifti(self, session: int) -> Path:
        return self.betas_dir / f"{self._session_name(session)}.nii.gz"

    def betas_hdf5(self, session: int) -> Path:
        return self.betas_dir / f"{self._session_name(session)}.hdf5"

    # -- ROIs ----------------------------------------------------------------------------------------------
    @property
    def roi_dir(self) -> Path:
        return self.root / "nsddata" / "ppdata" / self.subj / "func1pt8mm" / "roi"

    def roi_file(self, name: str) -> Path:
        """Volume label file ``roi/<name>.nii.gz`` (e.g. ``prf-visualrois``, ``floc-faces``)."""
        return self.roi_dir / f"{name}.nii.gz"

    @property
    def nsdgeneral(self) -> Path:
        return self.roi_file("nsdgeneral")

    # -- surfaces ------------------------------------------------------------------------------------------
    @property
    def freesurfer_label_dir(self) -> Path:
        return self.root / "nsddata" / "freesurfer" / self.subj / "label"

    def surface_label(self, hemi: str, roi: str) -> Path:
        """Surface label ``label/{lh,rh}.<roi>.mgz``; its label table is this path + ``.ctab``."""
        return self.freesurfer_label_dir / f"{_check_nsd_hemi(hemi)}.{roi}.mgz"

    @property
    def fsaverage_label_dir(self) -> Path:
        return self.root / "nsddata" / "freesurfer" / "fsaverage" / "label"

    def hemi_nsdgeneral(self, hemi: str) -> Path:
        """``roi/{lh,rh}.nsdgeneral.nii.gz``: which voxels are this hemisphere's cortex (-1 = not)."""
        return self.roi_file(f"{_check_nsd_hemi(hemi)}.nsdgeneral")

    # -- transforms (volume -> surface) --------------------------------------------------------------------
    @property
    def transforms_dir(self) -> Path:
        return self.root / "nsddata" / "ppdata" / self.subj / "transforms"

    def layer_coords(self, hemi: str, layer: str) -> Path:
        """``transforms/{lh,rh}.func1pt8-to-<layer>.mgz`` (layer one of :data:`LAYERS`)."""
        if layer not in LAYERS:
            raise ValueError(f"'layer' must be one of {list(LAYERS)}; {layer!r} was provided")
        return self.transforms_dir / f"{_check_nsd_hemi(hemi)}.func1pt8-to-{layer}.mgz"

    def white_to_fsaverage(self, hemi: str) -> Path:
        """``transforms/{lh,rh}.white-to-fsaverage.mgz``: nearest native vertex of every fsaverage vertex."""
        return self.transforms_dir / f"{_check_nsd_hemi(hemi)}.white-to-fsaverage.mgz"


def _check_nsd_hemi(hemi: str) -> str:
    if hemi not in ("lh", "rh"):
        raise ValueError(f"'hemi' must be one of ['lh', 'rh']; {hemi!r} was provided")
    return hemi


# ----------------------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------------------
def _as_int_array(name: str, value, shape: tuple[int, ...], low: int, high: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != shape:
        raise ValueError(f"'{name}' must have shape {shape}; {arr.shape} was provided")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"'{name}' must hold whole numbers; found non-integer values")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < low or arr.max() > high):
        raise ValueError(
            f"'{name}' must hold 1-based values in [{low}, {high}]; found range [{arr.min()}, {arr.max()}]"
        )
    return arr


def write_expdesign(path, masterordering, subjectim, sharedix) -> Path:
    """Write ``nsd_expdesign.mat`` as NSD ships it (MATLAB v5, 1-based integers).

    Parameters
    ----------
    masterordering : int array (1, 30000)
        For trial i (0-based over all 40 x 750 scheduled trials), the 1-based column of ``subjectim``.
    subjectim : int array (8, 10000)
        1-based 73k image ids each subject saw; columns 1..1000 are the shared images.
    sharedix : int array (1, 1000)
        1-based 73k ids of the shared 1000 images.
    """
    nsd = PAPER.nsd
    n_trials = 40 * nsd.trials_per_session
    mo = _as_int_array("masterordering", masterordering, (1, n_trials), 1, 10000)
    si = _as_int_array("subjectim", subjectim, (8, 10000), 1, nsd.n_stimuli)
    sh = _as_int_array("sharedix", sharedix, (1, nsd.shared_cutoff), 1, nsd.n_stimuli)
    import scipy.io

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            scipy.io.savemat(
                f,
                {
                    "masterordering": mo.astype(np.int32),
                    "subjectim": si.astype(np.int32),
                    "sharedix": sh.astype(np.int32),
                },
                do_compression=True,
            )
        # scipy stamps the 116-byte text header with the time: fix it so equal inputs give equal bytes
        with open(tmp, "r+b") as f:
            f.write(_MAT_HEADER_TEXT)
    return path


def _write_nifti_gz(path: Path, data: np.ndarray, affine, dtype) -> Path:
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"'affine' must have shape (4, 4); {affine.shape} was provided")
    # NIfTI stores x fastest (Fortran order): an F-ordered array is written without a per-chunk transpose
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype, order="F"), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise ValueError(f"NIfTI path must end with '.nii.gz'; {path.name!r} was provided")
    buf = io.BytesIO()
    img.to_stream(buf)
    # wbits 31: a gzip member (no name, mtime 0), so the same array always gives the same bytes
    deflate = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31, 8, _GZIP_STRATEGY)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw:
            raw.write(deflate.compress(buf.getbuffer()))
            raw.write(deflate.flush())
    return path


def write_betas_nifti(path, betas_int16, affine) -> Path:
    """Write one session of betas as NSD's ``betas_sessionNN.nii.gz``.

    Parameters
    ----------
    betas_int16 : int16 array (X, Y, Z, 750)
        Percent signal change x 300, as NSD stores it.
    affine : (4, 4) voxel -> scanner mm.
    """
    betas = np.asarray(betas_int16)
    if betas.dtype != np.int16 or betas.ndim != 4:
        raise ValueError(
            f"'betas_int16' must be an int16 array (X, Y, Z, trials); {betas.dtype} {betas.shape} was provided"
        )
    return _write_nifti_gz(Path(path), betas, affine, np.int16)


def write_betas_hdf5(path, betas_int16, chunk_trials: int = 1) -> Path:
    """Write one session of betas as NSD's ``betas_sessionNN.hdf5``.

    Parameters
    ----------
    betas_int16 : int16 array (X, Y, Z, 750)
        The same array :func:`write_betas_nifti` takes; it is stored transposed, as dataset ``betas`` of
        shape (750, Z, Y, X), the way NSD's MATLAB-written files appear in h5py.
    chunk_trials : int
        Trials per HDF5 chunk.
    """
    import h5py

    betas = np.asarray(betas_int16)
    if betas.dtype != np.int16 or betas.ndim != 4:
        raise ValueError(
            f"'betas_int16' must be an int16 array (X, Y, Z, trials); {betas.dtype} {betas.shape} was provided"
        )
    stored = np.ascontiguousarray(betas.transpose(3, 2, 1, 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("betas", data=stored, chunks=(max(1, int(chunk_trials)),) + stored.shape[1:])
    return path


def write_label_volume(path, labels, affine) -> Path:
    """Write an NSD label volume (``nsdgeneral``, ``prf-visualrois``, ``floc-*``, ...) as int16 NIfTI.

    Parameters
    ----------
    labels : int array (X, Y, Z)
        -1 outside the brain, 0 no label, 1..n labels (nsdgeneral: 1 inside the mask).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"'labels' must be an integer array (X, Y, Z); {labels.dtype} {labels.shape} was provided")
    return _write_nifti_gz(Path(path), labels, affine, np.int16)


def write_stimuli_hdf5(
    path, images: Mapping[int, np.ndarray], n_stimuli: int = PAPER.nsd.n_stimuli, image_size: int | None = None
) -> Path:
    """Write ``nsd_stimuli.hdf5``: dataset ``imgBrick`` (n_stimuli, S, S, 3) uint8.

    One image per chunk and no fill allocation, so images that are not given cost no disk and read back as
    zeros. ``images`` maps 0-based 73k ids to uint8 (S, S, 3) arrays. ``image_size`` S defaults to NSD's
    425 px (``PAPER.nsd.stimulus_size``); the MiniNSD world writes its 64 px scenes unscaled.
    """
    import h5py

    size = int(PAPER.nsd.stimulus_size if image_size is None else image_size)
    if size < 1:
        raise ValueError(f"'image_size' must be a positive number of pixels; {image_size!r} was provided")
    shape = (int(n_stimuli), size, size, 3)
    for image_id, img in images.items():
        if not 0 <= int(image_id) < n_stimuli:
            raise ValueError(f"image id must be in [0, {n_stimuli}); {image_id} was provided")
        arr = np.asarray(img)
        if arr.shape != shape[1:] or arr.dtype != np.uint8:
            raise ValueError(
                f"image {image_id} must be uint8 {shape[1:]}; {arr.dtype} {arr.shape} was provided"
            )
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            dset = f.create_dataset("imgBrick", shape=shape, dtype=np.uint8, chunks=(1,) + shape[1:])
            for image_id in sorted(images):
                dset[int(image_id)] = np.asarray(images[image_id])
    return path


def write_captions_npy(
    path, captions: Mapping[int, Sequence[str]], n_stimuli: int = PAPER.nsd.n_stimuli
) -> Path:
    """Write a curated caption array (n_stimuli, 5) of unicode strings, "" where an image has none.

    ``captions`` maps 0-based 73k ids to up to 5 captions. Readable with ``np.load(allow_pickle=False)``.
    """
    per = PAPER.nsd.captions_per_image
    width = max([1] + [len(c) for caps in captions.values() for c in caps])
    arr = np.zeros((int(n_stimuli), per), dtype=f"<U{width}")
    for image_id, caps in captions.items():
        if not 0 <= int(image_id) < n_stimuli:
            raise ValueError(f"image id must be in [0, {n_stimuli}); {image_id} was provided")
        if len(caps) > per:
            raise ValueError(f"image {image_id} has {len(caps)} captions; at most {per} are stored")
        arr[int(image_id), : len(caps)] = list(caps)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    return path


def write_coco_captions(
    stim_info_csv,
    captions_dir,
    captions: Mapping[int, Sequence[str]],
    *,
    coco_ids: Mapping[int, int] | None = None,
    coco_splits: Mapping[int, str] | None = None,
    n_stimuli: int = PAPER.nsd.n_stimuli,
) -> dict[str, Path]:
    """Write ``nsd_stim_info_merged.csv`` (n_stimuli rows) and COCO ``captions_<split>.json`` files.

    Parameters
    ----------
    stim_info_csv : path
        Target CSV; rows in 73k order with columns ``,cocoId,cocoSplit,nsdId`` (a subset of NSD's).
    captions_dir : path
        Folder for ``captions_train2017.json`` and ``captions_val2017.json``.
    captions : {73k id (0-based): [caption, ...]}
    coco_ids, coco_splits : optional {73k id: COCO image id / split}; default ``cocoId = 73k id + 1`` and
        the split alternating by id parity (ids are unique across splits, as in COCO).

    Returns
    -------
    {"csv": path, "train2017": path, "val2017": path}
    """
    coco_ids = dict(coco_ids or {})
    coco_splits = dict(coco_splits or {})

    def cid(i: int) -> int:
        return int(coco_ids.get(i, i + 1))

    def split(i: int) -> str:
        s = coco_splits.get(i, COCO_SPLITS[i % 2])
        if s not in COCO_SPLITS:
            raise ValueError(f"COCO split of image {i} must be one of {list(COCO_SPLITS)}; {s!r} was provided")
        return s

    stim_info_csv = Path(stim_info_csv)
    with atomic_path(stim_info_csv) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "cocoId", "cocoSplit", "nsdId"])
            for i in range(int(n_stimuli)):
                w.writerow([i, cid(i), split(i), i])

    annotations: dict[str, list] = {s: [] for s in COCO_SPLITS}
    images: dict[str, list] = {s: [] for s in COCO_SPLITS}
    ann_id = 1
    for i in sorted(captions):
        if not 0 <= int(i) < n_stimuli:
            raise ValueError(f"image id must be in [0, {n_stimuli}); {i} was provided")
        s = split(int(i))
        images[s].append({"id": cid(int(i))})
        for cap in captions[i]:
            annotations[s].append({"image_id": cid(int(i)), "id": ann_id, "caption": str(cap)})
            ann_id += 1
    out = {"csv": stim_info_csv}
    captions_dir = Path(captions_dir)
    for s in COCO_SPLITS:
        target = captions_dir / f"captions_{s}.json"
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps({"images": images[s], "annotations": annotations[s]}))
        out[s] = target
    return out


# ----------------------------------------------------------------------------------------------- surfaces
def write_mgh(path, data) -> Path:
    """Write a FreeSurfer MGH volume as NSD ships them: big-endian float32, gzipped when ``path`` ends in ``.mgz``.

    data : float array, 3-D or 4-D (nibabel's MGH shapes, e.g. (V, 1, 1) or (V, 1, 1, 3)); stored as float32
    (nibabel refuses float64). The affine is the identity (the files are per-vertex tables, not volumes).
    """
    import nibabel as nib

    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim not in (3, 4):
        raise ValueError(f"MGH data must be 3-D or 4-D (e.g. (n_vertices, 1, 1)); shape {arr.shape} was provided")
    raw = nib.MGHImage(arr, np.eye(4)).to_bytes()  # MGH is big-endian by definition
    path = Path(path)
    if not path.name.endswith((".mgz", ".mgh")):
        raise ValueError(f"MGH path must end with '.mgz' or '.mgh'; {path.name!r} was provided")
    with atomic_path(path) as tmp:
        if path.name.endswith(".mgz"):
            with open(tmp, "wb") as f, gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
                gz.write(raw)
        else:
            tmp.write_bytes(raw)
    return path


def write_layer_coords(path, coords_1based) -> Path:
    """Write ``{lh,rh}.func1pt8-to-layerB*.mgz``: float (V_h, 3) 1-based (i, j, k), rows of 9999 = no data.

    Stored as NSD does: shape (V_h, 1, 1, 3), big-endian float32.
    """
    c = np.asarray(coords_1based, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"'coords_1based' must have shape (n_vertices, 3); shape {c.shape} was provided")
    return write_mgh(path, c.reshape(-1, 1, 1, 3))


def write_white_to_fsaverage(path, native_index_1based) -> Path:
    """Write ``{lh,rh}.white-to-fsaverage.mgz``: int (163842,) 1-based native vertex of each fsaverage vertex."""
    idx = np.asarray(native_index_1based)
    if idx.shape != (FSAVERAGE_N_VERTICES,):
        raise ValueError(f"'native_index_1based' must have shape ({FSAVERAGE_N_VERTICES},) (one row per fsaverage "
                         f"vertex); shape {idx.shape} was provided")
    if idx.size and idx.min() < 1:
        raise ValueError(f"'native_index_1based' must hold 1-based indices (>= 1); minimum {idx.min()} was found")
    return write_mgh(path, idx.reshape(-1, 1, 1))


def write_surface_label(path, labels, names: Mapping[int, str]) -> Path:
    """Write a native-surface label ``label/{lh,rh}.<roi>.mgz`` (float32 (V_h, 1, 1)) and its ``.ctab``.

    labels : int (V_h,) 0 = no label; names : {label value: name} for the ctab (``0 Unknown`` is added first).
    """
    lab = np.asarray(labels)
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"'labels' must be an integer array (n_vertices,); {lab.dtype} {lab.shape} was provided")
    path = write_mgh(path, lab.reshape(-1, 1, 1))
    lines = ["0 Unknown"] + [f"{int(k)} {v}" for k, v in sorted(names.items()) if int(k) != 0]
    ctab = path.with_name(path.name + ".ctab")
    with atomic_path(ctab) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
