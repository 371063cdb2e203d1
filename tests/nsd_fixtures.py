"""Tiny NSD-format trees for tests: the same file names, formats, shapes and label values as NSD.

``make_nsd_tree(root)`` writes, with the writers of :mod:`brain_diffuser_core.nsd_format`:
``nsd_expdesign.mat`` (full NSD shapes), ``n_sessions`` betas files of 750 trials over a small volume,
nsdgeneral (-1 outside the brain, 0, 1) and the six ROI label files, a chunked sparse imgBrick
(73000, 425, 425, 3) holding a few images, and captions (COCO csv + json, optionally the curated .npy).
The returned :class:`NSDFixture` carries the ground truth the tests compare with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brain_diffuser_core.nsd_format import (
    NSDPaths,
    write_betas_hdf5,
    write_betas_nifti,
    write_captions_npy,
    write_coco_captions,
    write_expdesign,
    write_label_volume,
    write_stimuli_hdf5,
)

TRIALS = 750
# NSD label tables (PAPER.md), written out independently of the library's catalogue: value k+1 names entry k
NSD_LABELS = {
    "prf-visualrois": ["V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"],
    "prf-eccrois": ["ecc0pt5", "ecc1", "ecc2", "ecc4", "ecc4+"],
    "floc-faces": ["OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"],
    "floc-bodies": ["EBA", "FBA-1", "FBA-2", "mTL-bodies"],
    "floc-places": ["OPA", "PPA", "RSC"],
    "floc-words": ["OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"],
}
ROI_LABEL_COUNTS = {name: len(labels) for name, labels in NSD_LABELS.items()}


@dataclass
class NSDFixture:
    root: Path
    subject: int
    volume_shape: tuple[int, int, int]
    affine: np.ndarray
    nsdgeneral: np.ndarray  # int (X, Y, Z): -1 / 0 / 1
    masterordering: np.ndarray  # (30000,) 1-based
    subjectim: np.ndarray  # (8, 10000) 1-based
    sharedix: np.ndarray  # (1000,) 1-based
    sessions: tuple[int, ...]
    betas: dict[int, np.ndarray]  # session -> int16 (X, Y, Z, 750)
    roi_volumes: dict[str, np.ndarray]  # file stem -> int (X, Y, Z)
    images: dict[int, np.ndarray] = field(default_factory=dict)  # 73k id -> uint8 (425, 425, 3)
    captions: dict[int, list[str]] = field(default_factory=dict)  # 73k id -> captions (may include "")

    @property
    def paths(self) -> NSDPaths:
        return NSDPaths(self.root, self.subject)

    def trial_image_ids(self) -> np.ndarray:
        """0-based 73k id of every trial of the written sessions, in trial order."""
        trials = np.concatenate([np.arange((s - 1) * TRIALS, s * TRIALS) for s in self.sessions])
        return self.subjectim[self.subject - 1, self.masterordering[trials] - 1] - 1


def _design(rng: np.random.Generator, n_trials_used: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shared = np.sort(rng.choice(73000, 1000, replace=False)) + 1
    rest = np.setdiff1d(np.arange(1, 73001), shared)
    rest = rng.permutation(rest)[: 8 * 9000].reshape(8, 9000)
    subjectim = np.concatenate([np.tile(shared, (8, 1)), rest], axis=1)
    # trials of the used sessions come from a small pool so that images repeat (up to several times)
    pool = np.concatenate([rng.choice(np.arange(1, 1001), 40, replace=False), rng.choice(np.arange(1001, 10001), 400, replace=False)])
    masterordering = rng.integers(1, 10001, 30000)
    masterordering[:n_trials_used] = rng.choice(pool, n_trials_used)
    return masterordering, subjectim, shared


def _caption_text(image_id: int, k: int) -> str:
    return f"img {image_id} cap {k}"


def make_nsd_tree(
    root,
    subject: int = 1,
    n_sessions: int = 3,
    volume_shape: tuple[int, int, int] = (6, 7, 5),
    seed: int = 0,
    betas_format: str = "nii.gz",
    with_stimuli: bool = True,
    with_captions: bool = True,
    captions_npy: bool = False,
    n_stimuli_images: int = 6,
) -> NSDFixture:
    """Write a small NSD tree under ``root`` and return its ground truth.

    ``betas_format``: "nii.gz", "hdf5" or "both". ``with_captions`` writes the stim-info CSV and COCO json;
    ``captions_npy`` also writes the curated (73000, 5) array. Images are written for the first
    ``n_stimuli_images`` distinct ids shown (the rest of imgBrick stays unallocated).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    paths = NSDPaths(root, subject)
    x, y, z = volume_shape
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = [-x * 0.9, -y * 0.9, -z * 0.9]

    # design
    masterordering, subjectim, shared = _design(rng, n_sessions * TRIALS)
    write_expdesign(paths.expdesign, masterordering[None, :], subjectim, shared[None, :])

    # nsdgeneral: -1 on the volume border (outside brain), else 1 with probability 0.6, else 0
    nsdgeneral = np.full(volume_shape, -1, dtype=np.int16)
    inner = (slice(1, x - 1), slice(1, y - 1), slice(1, z - 1))
    nsdgeneral[inner] = (rng.random((x - 2, y - 2, z - 2)) < 0.6).astype(np.int16)
    write_label_volume(paths.nsdgeneral, nsdgeneral, affine)
    brain = nsdgeneral >= 0

    roi_volumes = {}
    for stem, n_labels in ROI_LABEL_COUNTS.items():
        vol = np.where(brain, rng.integers(0, n_labels + 1, volume_shape), -1).astype(np.int16)
        write_label_volume(paths.roi_file(stem), vol, affine)
        roi_volumes[stem] = vol

    sessions = tuple(range(1, n_sessions + 1))
    betas = {}
    for s in sessions:
        b = rng.integers(-3000, 3000, size=(x, y, z, TRIALS)).astype(np.int16)
        b[~brain] = 0
        betas[s] = b
        if betas_format in ("nii.gz", "both"):
            write_betas_nifti(paths.betas_nifti(s), b, affine)
        if betas_format in ("hdf5", "both"):
            write_betas_hdf5(paths.betas_hdf5(s), b)
        if betas_format not in ("nii.gz", "hdf5", "both"):
            raise ValueError(f"'betas_format' must be one of ['nii.gz', 'hdf5', 'both']; {betas_format!r} was provided")

    fixture = NSDFixture(
        root=root, subject=subject, volume_shape=tuple(volume_shape), affine=affine, nsdgeneral=nsdgeneral,
        masterordering=masterordering, subjectim=subjectim, sharedix=shared, sessions=sessions, betas=betas,
        roi_volumes=roi_volumes,
    )
    shown = list(dict.fromkeys(fixture.trial_image_ids().tolist()))
    if with_stimuli:
        for image_id in shown[:n_stimuli_images]:
            fixture.images[image_id] = rng.integers(0, 256, (425, 425, 3), dtype=np.uint8)
        write_stimuli_hdf5(paths.stimuli, fixture.images)
    if with_captions or captions_npy:
        for image_id in shown:
            n = int(rng.integers(0, 6))
            caps = [_caption_text(image_id, k) for k in range(n)]
            if n >= 2:
                caps[1] = ""  # NSD has empty caption slots
            fixture.captions[image_id] = caps
        if with_captions:
            write_coco_captions(paths.stim_info_csv, paths.annotations_dir, fixture.captions)
        if captions_npy:
            write_captions_npy(paths.captions_npy_candidates[0], fixture.captions)
    return fixture


def expected_arrays(fx: NSDFixture, sessions=None) -> dict[str, np.ndarray]:
    """Brain-Diffuser preparation computed the plain way: a loop over trials, then numpy statistics."""
    sessions = fx.sessions if sessions is None else tuple(sessions)
    mask = fx.nsdgeneral > 0
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    test_ids = set()
    for s in sessions:
        for t in range(TRIALS):
            trial = (s - 1) * TRIALS + t
            order = int(fx.masterordering[trial])
            image_id = int(fx.subjectim[fx.subject - 1, order - 1]) - 1
            if order <= 1000:
                test_ids.add(image_id)
            vol = fx.betas[s][..., t].astype(np.float64) / 300.0
            sums[image_id] = sums.get(image_id, 0.0) + vol[mask]
            counts[image_id] = counts.get(image_id, 0) + 1
    train_ids = np.array(sorted(set(sums) - test_ids), dtype=np.int64)
    test_ids_arr = np.array(sorted(test_ids), dtype=np.int64)
    train = np.stack([sums[i] / counts[i] for i in train_ids])
    test = np.stack([sums[i] / counts[i] for i in test_ids_arr])
    mean = train.mean(axis=0)
    std = train.std(axis=0, ddof=1)
    return {
        "train_image_ids": train_ids,
        "test_image_ids": test_ids_arr,
        "train_fmri": (train - mean) / std,
        "test_fmri": (test - mean) / std,
        "fmri_mean": mean,
        "fmri_std": std,
        "voxel_ijk": np.argwhere(mask),
    }
