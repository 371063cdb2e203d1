"""Build the MiniNSD world as a real NSD-format tree that :func:`brain_diffuser_core.nsd.load_subject` reads.

``build_world(out)`` generates captioned scenes (:mod:`.scenes`), simulates subjects 1, 2, 5 and 7
(:mod:`.observer`) watching them in an NSD-like design, and writes, with the writers of
:mod:`brain_diffuser_core.nsd_format`::

    <out>/world.json                                                  format version, parameters, checksums
    <out>/nsddata/experiments/nsd/nsd_expdesign.mat                   masterordering, subjectim, sharedix
    <out>/nsddata/ppdata/subjXX/func1pt8mm/roi/<name>.nii.gz          nsdgeneral + the six NSD ROI files
    <out>/nsddata/ppdata/subjXX/func1pt8mm/roi/{lh,rh}.nsdgeneral.nii.gz   hemispheres (-1 = not this one's)
    <out>/nsddata/ppdata/subjXX/transforms/{lh,rh}.func1pt8-to-layerB{1,2,3}.mgz, {lh,rh}.white-to-fsaverage.mgz
    <out>/nsddata/freesurfer/subjXX/label/{lh,rh}.<name>.mgz (+ .ctab)  the ROI files' labels on the vertices
    <out>/nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionNN.nii.gz
    <out>/nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5                imgBrick (73000, 64, 64, 3) uint8
    <out>/nsddata_stimuli/stimuli/nsd/annotations/COCO_73k_annots_curated.npy   (n_images, 5) captions
    <out>/world/images.json                  per image: 73k id, split, category, scene seed, graph, captions
    <out>/world/image_labels.npy             int64 (n_images,): category index (scenes.CATEGORIES) by 73k id
    <out>/world/tuning_subjXX.npz            the observer's ground truth, rows in the Subject's voxel order

Design (NSD's rules, smaller numbers)
-------------------------------------
* 73k ids ``0 .. n_test-1`` are the test images and ``n_test .. n_test+n_train-1`` the train images; image
  ``i`` is ``generate_scenes(n_images, seed)[i]`` (category-balanced).
* ``subjectim`` columns ``1..n_test`` (1-based) hold the test images for every subject: they lie among the
  shared 1000 columns, so the reader's rule ``masterordering <= 1000`` makes them the test set and
  ``sharedix`` lists them. Columns ``1001..1000+n_train`` hold the train images in a per-subject order (all
  subjects see the same train pool, unlike NSD). Unused columns point at ids past the world's images that no
  trial ever shows.
* Trials: each test image ``test_repeats`` times, each train image ``train_repeats`` times, then extra train
  repeats until the last session of 750 trials is full; shuffled with a seed. ``masterordering`` is shared by
  all subjects, as in NSD. The default sizes (3,600 train + 120 test, each shown 3 times) fill 15 sessions.
* Betas: ``Observer(subject, seed).responses`` with per-trial noise seeds ``seed_for("trial", subject,
  trial, base_seed=seed)``, stored as NSD does: int16 of percent signal change x 300, NIfTI ``.nii.gz``
  (chosen over HDF5: 4x smaller on disk, and a session reads in about 0.05 s either way).
* Volume ``observer.VOLUME_SHAPE`` (4 mm voxels). nsdgeneral is 1 at the observer's voxels, 0 elsewhere in
  their bounding box grown by one voxel, -1 outside; the ROI files carry NSD's label values at the voxels.
* Surface: a subject's native mesh is fsaverage5 itself (its voxels are fsaverage5 vertices, see
  :mod:`.observer`), so the transforms are NSD's files in their real formats with simple contents: each patch
  vertex's three depth coordinates are its voxel's centre (1-based), other vertices 9999; white-to-fsaverage
  rows 1..10,242 are the identity and the rows fsaverage adds beyond fsaverage5 point at native vertex 1 (the
  world has no finer mesh; fsaverage5 readers use only the first 10,242 rows). Read by
  :mod:`brain_diffuser_core.nsd_surface`, the same code as real NSD subjects.
* Stimuli stay at the scenes' 64 px (``Subject.image`` accepts any square imgBrick); imgBrick keeps NSD's
  73000 rows, unwritten rows cost no disk. The caption array has one row per world image (NSD's has
  73000 rows; the reader only needs a row for each id it is asked about).

Everything is a function of the parameters: two builds give identical arrays. The tree is built in a
temporary folder next to ``out`` and renamed into place (:func:`brain_diffuser_core.io.atomic_dir`), so a
failed build leaves nothing that looks complete. :func:`ensure_world` builds or rebuilds the app's cached
world when it is missing, from an older :data:`WORLD_FORMAT_VERSION` or built with other parameters.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import PAPER, cache_root
from ..io import atomic_dir, atomic_write_json, sha256_file
from ..nsd_format import (
    CAPTIONS_NPY_NAME,
    NSDPaths,
    write_betas_nifti,
    write_captions_npy,
    write_expdesign,
    write_label_volume,
    write_layer_coords,
    write_stimuli_hdf5,
    write_surface_label,
    write_white_to_fsaverage,
)
from ..seeding import seed_for
from .observer import DEFAULT_NOISE_SD
from .scenes import CATEGORIES, IMAGE_SIZE, generate_scene, scene_seed

__all__ = [
    "WORLD_FORMAT_VERSION",
    "DEFAULT_PARAMS",
    "WorldInfo",
    "build_world",
    "ensure_world",
    "world_params",
    "read_world_info",
    "world_is_current",
    "verify_world",
]

#: bump whenever the files' layout or meaning changes: older caches are then rebuilt, never misread
WORLD_FORMAT_VERSION = 4  # 4: opponent colour channels in the observer (2026-12-07)
#: build parameters of the default world (the app's): every image shown 3 times as in NSD;
#: 3 x 3,600 + 3 x 120 = 11,160 trials, 15 sessions (the last filled with extra train repeats)
DEFAULT_PARAMS: dict = {
    "n_train": 3600,
    "n_test": 120,
    "test_repeats": 3,
    "train_repeats": 3,
    "subjects": [1, 2, 5, 7],
    "seed": 0,
    "noise_sd": DEFAULT_NOISE_SD,  # NSD's noise ceiling (observer module docstring)
}
WORLD_JSON = "world.json"
_SCENE_CHUNK = 500

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class WorldInfo:
    """What a built world holds (also stored in ``<root>/world.json``).

    Attributes
    ----------
    root : Path
        NSD root folder of the world: pass it to ``load_subject(root, subject)``.
    params : dict
        Build parameters (see :data:`DEFAULT_PARAMS`).
    n_images, n_sessions, n_trials : int
        World images (73k ids ``0 .. n_images-1``), sessions of 750 trials per subject, trials per subject.
    test_image_ids, train_image_ids : tuple of int
        0-based 73k ids of the test (shared) and train images.
    n_voxels : dict {subject: int}
        nsdgeneral voxels per subject.
    build_seconds : float
        Wall time of the build.
    size_bytes : int
        Disk size of the tree.
    version : int
        :data:`WORLD_FORMAT_VERSION` of the files.
    """

    root: Path
    params: dict
    n_images: int
    n_sessions: int
    n_trials: int
    test_image_ids: tuple[int, ...]
    train_image_ids: tuple[int, ...]
    n_voxels: dict
    build_seconds: float
    size_bytes: int
    version: int = WORLD_FORMAT_VERSION
    files: dict = field(default_factory=dict, repr=False)

    def paths(self, subject: int) -> NSDPaths:
        """:class:`NSDPaths` of one of the world's subjects."""
        if int(subject) not in self.params["subjects"]:
            raise ValueError(f"'subject' must be one of {self.params['subjects']}; {subject!r} was provided")
        return NSDPaths(self.root, int(subject))


def world_params(
    *,
    n_train: int = DEFAULT_PARAMS["n_train"],
    n_test: int = DEFAULT_PARAMS["n_test"],
    test_repeats: int = DEFAULT_PARAMS["test_repeats"],
    train_repeats: int = DEFAULT_PARAMS["train_repeats"],
    subjects: Sequence[int] = tuple(DEFAULT_PARAMS["subjects"]),
    seed: int = DEFAULT_PARAMS["seed"],
    noise_sd: float = DEFAULT_PARAMS["noise_sd"],
) -> dict:
    """Checked, JSON-ready build parameters (the ``params`` of ``world.json``)."""
    nsd = PAPER.nsd
    n_subject_cols = 10000 - nsd.shared_cutoff  # subject-specific columns of subjectim (8, 10000)
    checks = [
        ("n_train", n_train, 2, n_subject_cols),
        ("n_test", n_test, 1, nsd.shared_cutoff),
        ("test_repeats", test_repeats, 1, 100),
        ("train_repeats", train_repeats, 1, 100),
    ]
    for name, value, lo, hi in checks:
        if isinstance(value, bool) or int(value) != value or not lo <= int(value) <= hi:
            raise ValueError(f"'{name}' must be an integer in [{lo}, {hi}]; {value!r} was provided")
    subjects = [int(s) for s in subjects]
    if not subjects or len(set(subjects)) != len(subjects) or not set(subjects) <= set(nsd.subjects):
        raise ValueError(f"'subjects' must be distinct values from {list(nsd.subjects)}; {list(subjects)} was provided")
    if not float(noise_sd) >= 0:
        raise ValueError(f"'noise_sd' must be >= 0; {noise_sd!r} was provided")
    if int(seed) < 0:
        raise ValueError(f"'seed' must be a non-negative integer; {seed!r} was provided")
    n_trials = int(n_test) * int(test_repeats) + int(n_train) * int(train_repeats)
    n_sessions = math.ceil(n_trials / nsd.trials_per_session)
    if n_sessions > nsd.n_sessions:
        raise ValueError(
            f"n_test x test_repeats + n_train x train_repeats must fit {nsd.n_sessions} sessions of "
            f"{nsd.trials_per_session} trials; {n_trials} trials were asked for"
        )
    return {"n_train": int(n_train), "n_test": int(n_test), "test_repeats": int(test_repeats),
            "train_repeats": int(train_repeats), "subjects": sorted(subjects), "seed": int(seed),
            "noise_sd": float(noise_sd)}


# ---------------------------------------------------------------------------------------------- design
def _design(p: dict) -> dict[str, np.ndarray]:
    """masterordering (30000,), subjectim (8, 10000), sharedix (1000,) (all 1-based), n_sessions, n_trials."""
    nsd = PAPER.nsd
    tps, cut = nsd.trials_per_session, nsd.shared_cutoff
    n_test, n_train = p["n_test"], p["n_train"]
    n_images = n_test + n_train
    n_cols = 10000
    # filler ids (1-based) past the world's images for columns no trial uses: one per column
    filler = n_images + 1 + np.arange(n_cols)
    subjectim = np.tile(filler, (8, 1))
    subjectim[:, :n_test] = np.arange(1, n_test + 1)  # shared columns 1..n_test: the test images
    train_ids = np.arange(n_test, n_images) + 1
    for row in range(8):
        rng = np.random.default_rng(seed_for("subjectim", row + 1, base_seed=p["seed"]))
        subjectim[row, cut:cut + n_train] = rng.permutation(train_ids)
    sharedix = subjectim[0, :cut].copy()

    test_cols = np.repeat(np.arange(1, n_test + 1), p["test_repeats"])
    train_cols = np.repeat(np.arange(cut + 1, cut + n_train + 1), p["train_repeats"])
    n_used = len(test_cols) + len(train_cols)
    n_sessions = math.ceil(n_used / tps)
    rng = np.random.default_rng(seed_for("masterordering", base_seed=p["seed"]))
    pad = n_sessions * tps - n_used
    extra = np.resize(rng.permutation(np.arange(cut + 1, cut + n_train + 1)), pad)  # extra train repeats
    schedule = rng.permutation(np.concatenate([test_cols, train_cols, extra]))
    # sessions the world does not write still need valid entries: repeat the schedule
    masterordering = np.resize(schedule, 40 * tps)
    return {"masterordering": masterordering, "subjectim": subjectim, "sharedix": sharedix,
            "n_sessions": n_sessions, "n_trials": n_sessions * tps}


# ---------------------------------------------------------------------------------------------- volumes
def _brain_box(ijk: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """bool volume: the bounding box of ``ijk`` grown by one voxel, clipped to ``shape``."""
    lo = np.maximum(ijk.min(0) - 1, 0)
    hi = np.minimum(ijk.max(0) + 2, np.asarray(shape))
    box = np.zeros(tuple(shape), bool)
    box[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return box


def _subject_order(ijk: np.ndarray) -> np.ndarray:
    """Permutation putting the observer's voxels in the reader's order (C order of the volume)."""
    return np.lexsort((ijk[:, 2], ijk[:, 1], ijk[:, 0]))


def _write_subject(root: Path, subject: int, obs, feats: np.ndarray, design: dict, p: dict,
                   tick: Callable[[str], None]) -> int:
    """Write one subject's ROI volumes, betas sessions and ground truth; return its voxel count."""
    from .channels import CHANNELS
    from .observer import ROI_FILES, VOLUME_SHAPE

    paths = NSDPaths(root, subject)
    ijk = obs.voxel_ijk
    i, j, k = ijk.T
    box = _brain_box(ijk, VOLUME_SHAPE)
    labels = obs.roi_labels()
    for name in ROI_FILES:  # nsdgeneral and the six NSD ROI files
        vol = np.where(box, 0, -1).astype(np.int16)
        vol[i, j, k] = labels[name]
        write_label_volume(paths.roi_file(name), vol, obs.affine)

    tps = PAPER.nsd.trials_per_session
    mo, subjectim = design["masterordering"], design["subjectim"]
    # noise-free responses once per image (each is shown several times), the trial noise per trial: the same
    # numbers as obs.responses(feats[image_ids], seeds=seeds) (tests/test_world_build.py checks it)
    mean = obs.responses(feats, noise=False)  # (n_images, n_voxels) float32
    for s in range(1, design["n_sessions"] + 1):
        trials = np.arange((s - 1) * tps, s * tps)
        image_ids = subjectim[subject - 1, mo[trials] - 1] - 1
        seeds = [seed_for("trial", subject, int(t), base_seed=p["seed"]) for t in trials]
        resp = obs.add_noise(mean[image_ids], seeds=seeds)  # (750, n_voxels) percent signal change
        scaled = np.clip(np.rint(resp * PAPER.nsd.beta_scale), -32768, 32767).astype(np.int16)
        betas = np.zeros(tuple(VOLUME_SHAPE) + (tps,), np.int16, order="F")  # NIfTI order: written as is
        betas[i, j, k, :] = scaled.T
        write_betas_nifti(paths.betas_nifti(s), betas, obs.affine)
        tick(f"subj{subject:02d} session {s}")

    order = _subject_order(ijk)
    t = obs.tuning
    truth = {f: np.asarray(getattr(t, f))[order] for f in t.__dataclass_fields__}
    for f in ("area", "preferred"):
        truth[f] = truth[f].astype("U16")
    world_dir = root / "world"
    _save_npz(world_dir / f"tuning_subj{subject:02d}.npz", voxel_ijk=ijk[order], channels=np.array(CHANNELS),
              observer_index=order.astype(np.int64), **truth)
    _write_surface_files(paths, obs, box, labels)
    return int(obs.n_voxels)


def _write_surface_files(paths: NSDPaths, obs, box: np.ndarray, labels: dict) -> None:
    """NSD's hemisphere volumes, volume -> surface transforms and surface labels for an observer whose native
    mesh is fsaverage5 (each voxel is one fsaverage5 vertex; see the module docstring)."""
    from ..nsd_format import FSAVERAGE_N_VERTICES, INVALID_COORD, LAYERS, NSD_HEMIS
    from .observer import ROI_TABLES

    n_native = 10242  # fsaverage5 vertices a hemisphere
    w2f = np.ones(FSAVERAGE_N_VERTICES, np.int64)
    w2f[:n_native] = np.arange(1, n_native + 1)
    for hemi, h in NSD_HEMIS.items():
        sel = obs.hemisphere == hemi
        ijk, other = obs.voxel_ijk[sel], obs.voxel_ijk[~sel]
        vol = np.where(box, 0, -1).astype(np.int16)
        vol[tuple(other.T)] = -1
        vol[tuple(ijk.T)] = 1
        write_label_volume(paths.hemi_nsdgeneral(h), vol, obs.affine)
        coords = np.full((n_native, 3), INVALID_COORD)
        coords[obs.vertex_index[sel]] = ijk + 1  # 1-based voxel centres
        for layer in LAYERS:
            write_layer_coords(paths.layer_coords(h, layer), coords)
        write_white_to_fsaverage(paths.white_to_fsaverage(h), w2f)
        for name, table in ROI_TABLES.items():
            lab = np.zeros(n_native, np.int64)
            lab[obs.vertex_index[sel]] = labels[name][sel]
            write_surface_label(paths.surface_label(h, name), lab, table)


def _save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _scene_record(image_id: int, scene, split: str) -> dict:
    return {"id": image_id, "split": split, "category": scene.category, "label": int(scene.label),
            "seed": int(scene.seed), "background": scene.background, "captions": list(scene.captions),
            "objects": [asdict(o) for o in scene.objects]}


def _tree_files(root: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != WORLD_JSON:
            out[path.relative_to(root).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


# ------------------------------------------------------------------------------------------------ build
def build_world(
    out,
    *,
    n_train: int = DEFAULT_PARAMS["n_train"],
    n_test: int = DEFAULT_PARAMS["n_test"],
    test_repeats: int = DEFAULT_PARAMS["test_repeats"],
    train_repeats: int = DEFAULT_PARAMS["train_repeats"],
    subjects: Sequence[int] = tuple(DEFAULT_PARAMS["subjects"]),
    seed: int = DEFAULT_PARAMS["seed"],
    noise_sd: float = DEFAULT_PARAMS["noise_sd"],
    progress: ProgressFn | None = None,
) -> WorldInfo:
    """Build the MiniNSD world into ``out`` (replacing what is there only once the build succeeded).

    Parameters
    ----------
    out : path
        Folder to create; it becomes an NSD root for ``load_subject(out, subject)``.
    n_train, n_test : int
        Train images (each subject sees all of them) and test images (the shared set).
    test_repeats, train_repeats : int
        Trials per test / train image (the last session is filled with extra train repeats).
    subjects : sequence of int
        Subset of 1, 2, 5, 7.
    seed : int
        World seed: scenes, observers, design and trial noise all derive from it.
    noise_sd : float
        Observer trial noise, percent signal change (see :class:`.observer.Observer`).
    progress : callable(step: str, done: int, total: int), optional
        Called after each step (scene chunks, observers, sessions, checksums).

    Returns
    -------
    WorldInfo
    """
    from .channels import scene_features
    from .observer import Observer

    # 1. Check inputs
    p = world_params(n_train=n_train, n_test=n_test, test_repeats=test_repeats, train_repeats=train_repeats,
                     subjects=subjects, seed=seed, noise_sd=noise_sd)
    out = Path(out)
    start = time.perf_counter()
    design = _design(p)
    n_images = p["n_test"] + p["n_train"]
    n_chunks = math.ceil(n_images / _SCENE_CHUNK)
    total = n_chunks + 2 + len(p["subjects"]) * (design["n_sessions"] + 1) + 1
    done = 0

    def tick(step: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(step, done, total)

    with atomic_dir(out) as tmp:
        # 2. Scenes (73k id = scene index) and their observer features
        scenes = []
        for c in range(n_chunks):
            scenes.extend(_scene_chunk(c, n_images, p["seed"]))
            tick(f"scenes {len(scenes)}/{n_images}")
        feats = scene_features(scenes)
        tick("scene features")

        # 3. Design, stimuli, captions, image ground truth
        paths = NSDPaths(tmp, p["subjects"][0])
        write_expdesign(paths.expdesign, design["masterordering"][None, :], design["subjectim"],
                        design["sharedix"][None, :])
        write_stimuli_hdf5(paths.stimuli, {i: s.image for i, s in enumerate(scenes)}, image_size=IMAGE_SIZE)
        write_captions_npy(paths.annotations_dir / CAPTIONS_NPY_NAME,
                           {i: s.captions for i, s in enumerate(scenes)}, n_stimuli=n_images)
        records = [_scene_record(i, s, "test" if i < p["n_test"] else "train") for i, s in enumerate(scenes)]
        (tmp / "world").mkdir(parents=True, exist_ok=True)
        (tmp / "world" / "images.json").write_text(
            json.dumps({"categories": list(CATEGORIES), "images": records}, separators=(",", ":")) + "\n")
        with open(tmp / "world" / "image_labels.npy", "wb") as f:
            np.save(f, np.array([s.label for s in scenes], np.int64), allow_pickle=False)
        tick("design, stimuli, captions")

        # 4. Subjects
        n_voxels = {}
        for subject in p["subjects"]:
            obs = Observer(subject, seed=p["seed"], noise_sd=p["noise_sd"])
            tick(f"observer subj{subject:02d}")
            n_voxels[subject] = _write_subject(tmp, subject, obs, feats, design, p, tick)

        # 5. world.json last: checksums of every file
        files = _tree_files(tmp)
        size = sum(f["bytes"] for f in files.values())
        info = WorldInfo(
            root=out, params=p, n_images=n_images, n_sessions=design["n_sessions"], n_trials=design["n_trials"],
            test_image_ids=tuple(range(p["n_test"])), train_image_ids=tuple(range(p["n_test"], n_images)),
            n_voxels=n_voxels, build_seconds=round(time.perf_counter() - start, 2), size_bytes=size, files=files,
        )
        atomic_write_json(tmp / WORLD_JSON, _info_json(info))
        tick("checksums")
    return info


def _scene_chunk(c: int, n_images: int, seed: int) -> list:
    """Scenes ``c*_SCENE_CHUNK ..`` of ``generate_scenes(n_images, seed)``, generated without the others."""
    lo, hi = c * _SCENE_CHUNK, min(n_images, (c + 1) * _SCENE_CHUNK)
    return [generate_scene(scene_seed(i, seed), CATEGORIES[i % len(CATEGORIES)]) for i in range(lo, hi)]


def _info_json(info: WorldInfo) -> dict:
    return {
        "format": "MiniNSD", "version": info.version, "params": info.params, "n_images": info.n_images,
        "n_sessions": info.n_sessions, "n_trials": info.n_trials, "n_test": len(info.test_image_ids),
        "n_voxels": {str(k): v for k, v in info.n_voxels.items()}, "build_seconds": info.build_seconds,
        "size_bytes": info.size_bytes, "files": info.files,
    }


def read_world_info(root) -> WorldInfo:
    """The :class:`WorldInfo` stored in ``<root>/world.json``; FileNotFoundError / ValueError when absent or bad."""
    root = Path(root)
    path = root / WORLD_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no MiniNSD world at {root}: expected {path}")
    try:
        d = json.loads(path.read_text())
        p = d["params"]
        n_test, n_images = int(p["n_test"]), int(d["n_images"])
        return WorldInfo(
            root=root, params=p, n_images=n_images, n_sessions=int(d["n_sessions"]), n_trials=int(d["n_trials"]),
            test_image_ids=tuple(range(n_test)), train_image_ids=tuple(range(n_test, n_images)),
            n_voxels={int(k): int(v) for k, v in d["n_voxels"].items()}, build_seconds=float(d["build_seconds"]),
            size_bytes=int(d["size_bytes"]), version=int(d["version"]), files=dict(d["files"]),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a MiniNSD world.json ({err!r})") from err


def world_is_current(root, params: dict | None = None) -> bool:
    """True when ``root`` holds a complete world of this :data:`WORLD_FORMAT_VERSION` built with ``params``.

    Cheap (no checksums): the version and parameters must match and every listed file must exist with its
    recorded size. ``params`` defaults to :data:`DEFAULT_PARAMS`; use :func:`verify_world` for checksums.
    """
    want = world_params(**(DEFAULT_PARAMS if params is None else params))
    try:
        info = read_world_info(root)
    except (FileNotFoundError, ValueError):
        return False
    if info.version != WORLD_FORMAT_VERSION or info.params != want or not info.files:
        return False
    for rel, meta in info.files.items():
        path = Path(root) / rel
        if not path.is_file() or path.stat().st_size != int(meta["bytes"]):
            return False
    return True


def verify_world(root) -> list[str]:
    """Files of the world whose sha256 differs from ``world.json`` (or that are missing); [] when intact."""
    info = read_world_info(root)
    bad = []
    for rel, meta in info.files.items():
        path = Path(root) / rel
        if not path.is_file() or sha256_file(path) != meta["sha256"]:
            bad.append(rel)
    return bad


def ensure_world(cache_dir=None, progress: ProgressFn | None = None, **params) -> Path:
    """The root of a current MiniNSD world, built first if missing or stale (for the app's first run).

    Parameters
    ----------
    cache_dir : path, optional
        Parent folder; default :func:`brain_diffuser_core.config.cache_root`. The world lives in
        ``<cache_dir>/mininsd-v<WORLD_FORMAT_VERSION>``.
    progress : callable(step, done, total), optional
        Passed to :func:`build_world` when a build is needed.
    **params
        Overrides of :data:`DEFAULT_PARAMS` (a world built with other parameters is rebuilt).

    Returns
    -------
    Path
        NSD root of the world (``load_subject(root, subject)``).
    """
    unknown = sorted(set(params) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(f"ensure_world parameters must be among {sorted(DEFAULT_PARAMS)}; {unknown} were provided")
    full = world_params(**{**DEFAULT_PARAMS, **params})
    root = Path(cache_dir if cache_dir is not None else cache_root()) / f"mininsd-v{WORLD_FORMAT_VERSION}"
    if not world_is_current(root, full):
        build_world(root, progress=progress, **full)
    return root

