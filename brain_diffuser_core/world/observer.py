"""Simulated MiniNSD observers: subjects 1, 2, 5 and 7 on a posterior patch of fsaverage5.

The model (a schematic, not an anatomical atlas)
------------------------------------------------
**Voxels.** Each subject's "voxels" are the vertices of a posterior cortical patch of nilearn's bundled
fsaverage5 (both hemispheres, pial coordinates in mm, ~MNI305). The patch is the union of an occipital part
(``y < -70``), a ventral temporal part (``y < -30, z < -4, |x| > 15``), a lateral occipito-temporal part
(``y < -45, |x| > 42, z < 10``) and a medial parieto-occipital part (``y < -50, |x| < 18, z < 25``); each
threshold is jittered by up to +-2 mm per subject, so subjects have different voxel counts (about
3,700-4,000). All of them count as ``nsdgeneral`` (label 1); the builder writes 0/-1 elsewhere.

**Retinotopy (V1, V2, V3, hV4).** Around the occipital pole (the most posterior pial vertex, jittered
+-2 mm), a vertex at offset ``d`` has cortical distance ``r = |d|`` and elevation ``psi =
atan2(d_z, hypot(d_x, d_y))`` (degrees; dorsal > 0). Within ``r < 38 mm`` the elevation wedges (jittered
+-2 deg) are V1 ``[-15, 18)`` (V1d above 0, V1v below), V2d ``[18, 38)``, V3d ``[38, 58)``, V2v
``[-35, -15)``, V3v ``[-50, -35)``, hV4 ``[-80, -50)``. Eccentricity follows a log cortical magnification
``ecc = 0.75 * (exp(r / A) - 1)`` deg with ``A = 38 / ln(1 + 8 / 0.75)`` (8 deg at the rim). Polar angle
(visual field, degrees, 0 = horizontal meridian, +90 = upper vertical meridian) runs from the horizontal
meridian at V1's centre line to the vertical meridians at the V1/V2 borders, back to horizontal at V2/V3
and vertical at the V3 outer borders (dorsal areas = lower field, ventral = upper field); hV4 spans the
hemifield from +90 to -90. The left hemisphere sees the right visual field and vice versa. pRF size
(Gaussian sigma, degrees) grows with eccentricity and area: V1 ``0.15 + 0.10 e``, V2 ``0.2 + 0.15 e``,
V3 ``0.3 + 0.22 e``, hV4 ``0.5 + 0.35 e``. Eccentricity bands (NSD prf-eccrois) are
ecc0pt5 ``< 0.5``, ecc1 ``< 1``, ecc2 ``< 2``, ecc4 ``< 4``, ecc4+ ``>= 4`` deg, within V1-hV4.

**Category areas.** Disks (radius 6-8 mm, jittered) around literature-like coordinates (left hemisphere
listed; the right mirrors x), snapped to patch vertices outside V1-hV4; where disks overlap the nearest
centre wins, so category areas are disjoint:

=========== ================= =========== ================ =========== ================
faces       (x, y, z) mm      bodies                       places
OFA         (-40, -82, -6)    EBA         (-48, -72, 4)    OPA         (-32, -84, 20)
FFA-1       (-38, -64, -18)   FBA-1       (-44, -52, -8)   PPA         (-26, -46, -10)
FFA-2       (-38, -48, -20)   FBA-2       (-44, -40, -10)  RSC         (-12, -56, 10)
mTL-faces   (-36, -34, -22)   mTL-bodies  (-52, -48, 2)
=========== ================= =========== ================ =========== ================

words (left hemisphere only, after the literature's left lateralisation): OWFA (-44, -74, -14), VWFA-1
(-46, -58, -12), VWFA-2 (-46, -46, -12), mfs-words (-40, -38, -14), mTL-words (-54, -40, -2).
**Omitted**: aTL-faces (anterior temporal pole, ``y ~ -8``, outside the posterior patch): label 5 of
floc-faces never occurs. Label values follow NSD's files (:data:`ROI_TABLES`).

**Responses.** Each scene is summarised on a 16 x 16 grid over the 8.4 deg image by the channels of
:mod:`.channels` (three contrast bands, saturation, the local mean colour in an opponent space: luminance,
red-green, blue-yellow, and the coverage of each category's objects), scaled to mean magnitude 1 over a
reference set of scenes. A voxel's drive is ``sum_c w_c * <pRF, channel_c>`` with a Gaussian pRF
normalised to unit volume over the whole visual field (so pRFs off the image get little drive). Weights:
V1 prefers fine contrast (1.0, 0.35, 0.1 over fine/mid/coarse; saturation 0.05); V2 (0.6, 0.7, 0.2; 0.15);
V3 (0.35, 0.7, 0.4; 0.3); hV4 (0.1, 0.4, 0.4; saturation 1.0, object 0.4). Every V1-hV4 voxel also has
its own luminance sign (ON or OFF) and preferred hue (a random direction in the red-green x blue-yellow
plane), of magnitude (luminance, hue) V1 (0.3, 0.3), V2 (0.3, 0.35), V3 (0.25, 0.4), hV4 (0.15, 0.8): an
ROI's mean tuning carries no colour, its voxels do (as colour is decoded from V1-V4, and hV4 holds hue
maps). Before 2026-12-07 the world had no opponent channels, so no hue or mean luminance could be decoded
from it at all. Category areas weight their category's coverage 1.0 plus mid contrast 0.15, with large pRFs
(sigma 1.5-3.5 deg) near the fovea (places: larger and more eccentric). Other patch vertices take a random
Dirichlet mixture of the unsigned channels and a random pRF. Each voxel's drive is standardised with its mean
and standard deviation over a fixed reference set of 120 scenes, multiplied by the fraction of its pRF that
falls on the image and by a per-subject, per-voxel gain (lognormal, median 1.0), plus a baseline (about 0.5).
Units are percent-signal-change-like.

**Noise.** Trial noise = ``noise_sd * (sqrt(1 - rho) * e_voxel + sqrt(rho) * l_voxel * e_trial)``,
Gaussian, with a shared trial component (``rho = 0.2``, per-voxel loadings ``l``) like NSD's global
fluctuations. ``noise_sd`` (default :data:`DEFAULT_NOISE_SD` = 2.3) is set so the world's noise ceiling,
computed as NSD does (``benchmarks/world_noise_ceiling.py``: ncsnr = signal sd / noise sd, NC = ncsnr^2 /
(ncsnr^2 + 1/n)), is NSD's: median ncsnr 0.33, NC 10% for a single trial and 24-25% for the mean of 3 trials
(on-image voxels 30-31%), beside the 24.2% reported for NSD's volumetric nsdgeneral voxels (brain-score's
Allen2022 notebooks; not checked against NSD's files here). The world before 2026-12-04 used 3.0 (NC 16% for
3 trials: noisier than NSD). Pooled over thousands of voxels, linear decoding works well even at 3.0
(measured on subject 1, ridge alpha 2e4 fitted on 8,000 single trials, tested on 2,000: 6-way scene category
99% correct; the observer's own input channels predicted with median r 0.71). Targets the observer does not
encode linearly (VDVAE latents, CLIP embeddings) decode less well; raise ``noise_sd`` for a harder world.

Example
-------
>>> from brain_diffuser_core.world.scenes import generate_scenes
>>> obs = Observer(1)
>>> scenes = generate_scenes(12, seed=0)
>>> y = obs.responses(scenes, seeds=range(12))        # float32 (12, obs.n_voxels)
>>> y0 = obs.responses(scenes, noise=False)            # the noise-free ground truth
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..config import PAPER
from ..rois import ROI_CATALOGUE
from ..seeding import seed_for
from .channels import (CHANNELS, GRID, N_PIXEL_CHANNELS, OPPONENT_CHANNELS, channel_scale, reference_features,
                       scene_features)
from .scenes import FIELD_DEG, Scene

__all__ = [
    "ROI_TABLES",
    "ROI_FILES",
    "DEFAULT_NOISE_SD",
    "VOLUME_SHAPE",
    "VOXEL_SIZE_MM",
    "Tuning",
    "Observer",
]


def _nsd_label_tables() -> dict[str, dict[int, str]]:
    """NSD ROI files and their label tables, derived from the one source: :data:`rois.ROI_CATALOGUE`."""
    tables: dict[str, dict[int, str]] = {}
    for spec in ROI_CATALOGUE.values():
        if spec.labels is not None and len(spec.labels) == 1 and spec.group in ("fine", "eccentricity"):
            tables.setdefault(spec.file, {})[int(spec.labels[0])] = spec.name
    order = ("prf-visualrois", "prf-eccrois", "floc-faces", "floc-bodies", "floc-places", "floc-words")
    out = {f: dict(sorted(tables[f].items())) for f in order}
    out["nsdgeneral"] = {1: "nsdgeneral"}
    return out


#: NSD ROI files and their label tables (value -> name); 0 = not in an ROI. Built from
#: :data:`brain_diffuser_core.rois.ROI_CATALOGUE` (single-label entries), plus ``nsdgeneral``.
ROI_TABLES: dict[str, dict[int, str]] = _nsd_label_tables()
ROI_FILES: tuple[str, ...] = tuple(ROI_TABLES)
#: Trial noise sd (percent signal change) of the default world: NSD's noise ceiling (see the module docstring).
DEFAULT_NOISE_SD = 2.3
#: Volume the patch vertices are arranged into (see :attr:`Observer.voxel_ijk`) and its voxel size.
VOLUME_SHAPE: tuple[int, int, int] = (36, 24, 20)
VOXEL_SIZE_MM = 4.0

_HEMIS = ("left", "right")
_FLOC_FILE = {"face": "floc-faces", "body": "floc-bodies", "place": "floc-places", "word": "floc-words"}
# (name, category, left-hemisphere centre in mm, radius mm, hemispheres)
_CATEGORY_ROIS = [
    ("OFA", "face", (-40, -82, -6), 7.0, _HEMIS),
    ("FFA-1", "face", (-38, -64, -18), 7.0, _HEMIS),
    ("FFA-2", "face", (-38, -48, -20), 7.0, _HEMIS),
    ("mTL-faces", "face", (-36, -34, -22), 6.0, _HEMIS),
    ("EBA", "body", (-48, -72, 4), 8.0, _HEMIS),
    ("FBA-1", "body", (-44, -52, -8), 6.0, _HEMIS),
    ("FBA-2", "body", (-44, -40, -10), 6.0, _HEMIS),
    ("mTL-bodies", "body", (-52, -48, 2), 6.0, _HEMIS),
    ("OPA", "place", (-32, -84, 20), 8.0, _HEMIS),
    ("PPA", "place", (-26, -46, -10), 8.0, _HEMIS),
    ("RSC", "place", (-12, -56, 10), 7.0, _HEMIS),
    ("OWFA", "word", (-44, -74, -14), 7.0, ("left",)),
    ("VWFA-1", "word", (-46, -58, -12), 8.0, ("left",)),
    ("VWFA-2", "word", (-46, -46, -12), 8.0, ("left",)),
    ("mfs-words", "word", (-40, -38, -14), 7.0, ("left",)),
    ("mTL-words", "word", (-54, -40, -2), 8.0, ("left",)),
]
# elevation wedges (deg) of the retinotopic chart: (area, label in prf-visualrois, lo, hi)
_WEDGES = [("V1", 1, -15.0, 0.0), ("V1", 2, 0.0, 18.0), ("V2", 4, 18.0, 38.0), ("V3", 6, 38.0, 58.0),
           ("V2", 3, -35.0, -15.0), ("V3", 5, -50.0, -35.0), ("hV4", 7, -80.0, -50.0)]
_CHART_RADIUS = 38.0
_E2, _EMAX = 0.75, 8.0
_PRF_SIZE = {"V1": (0.15, 0.10), "V2": (0.2, 0.15), "V3": (0.3, 0.22), "hV4": (0.5, 0.35)}
#: the channels every voxel weights with a positive weight (all but the signed opponent ones)
_UNSIGNED = tuple(c for c in CHANNELS if c not in OPPONENT_CHANNELS)
_EARLY_WEIGHTS = {  # over _UNSIGNED: fine, mid, coarse, saturation, face, body, place, word, object
    "V1": (1.0, 0.35, 0.1, 0.05, 0, 0, 0, 0, 0),
    "V2": (0.6, 0.7, 0.2, 0.15, 0, 0, 0, 0, 0),
    "V3": (0.35, 0.7, 0.4, 0.3, 0, 0, 0, 0, 0),
    "hV4": (0.1, 0.3, 0.3, 1.0, 0, 0, 0, 0, 0.3),
}
#: magnitude of the (luminance, chromatic) opponent weights of V1-hV4 voxels; each voxel has its own sign of
#: luminance preference (ON / OFF) and its own preferred hue (a random direction in the red-green x
#: blue-yellow plane), so an ROI's mean tuning carries no colour while its voxels do, as hue maps in V1-V4
_OPPONENT_WEIGHTS = {"V1": (0.3, 0.3), "V2": (0.3, 0.35), "V3": (0.25, 0.4), "hV4": (0.15, 0.8)}
_ECC_EDGES = (0.5, 1.0, 2.0, 4.0)
_NOISE_RHO = 0.2


@dataclass(frozen=True)
class Tuning:
    """Ground truth of an observer's voxels (all arrays have length n_voxels).

    Attributes
    ----------
    area : np.ndarray of str
        ``"V1"``, ``"V2"``, ``"V3"``, ``"hV4"``, ``"faces"``, ``"bodies"``, ``"places"``, ``"words"`` or
        ``"other"`` (mixed tuning).
    preferred : np.ndarray of str
        Preferred scene category (one of ``CATEGORIES``: ``"face"``, ``"body"``, ``"place"``, ``"word"``;
        ``"texture"`` for V1-V3, ``"object"`` for hV4); for ``"other"`` voxels the category of their largest
        category weight, or ``""`` when low-level channels dominate.
    prf_x, prf_y : np.ndarray, float32
        pRF centre in degrees of visual angle (x right, y up; image centre = 0).
    prf_size : np.ndarray, float32
        pRF Gaussian sigma in degrees.
    eccentricity, polar_angle : np.ndarray, float32
        Retinotopic chart coordinates in degrees (NaN outside V1-hV4); polar angle 0 = horizontal meridian,
        +90 = upper vertical meridian.
    weights : np.ndarray, float32, shape (n_voxels, len(CHANNELS))
        Channel weights (see :data:`CHANNELS`).
    gain : np.ndarray, float32
        Per-voxel response gain (percent signal change per reference standard deviation of drive).
    baseline : np.ndarray, float32
        Per-voxel mean response (percent signal change).
    visibility : np.ndarray, float32
        Fraction of the pRF's volume over the 8.4 deg image.
    """

    area: np.ndarray
    preferred: np.ndarray
    prf_x: np.ndarray
    prf_y: np.ndarray
    prf_size: np.ndarray
    eccentricity: np.ndarray
    polar_angle: np.ndarray
    weights: np.ndarray
    gain: np.ndarray
    baseline: np.ndarray
    visibility: np.ndarray


# ---------------------------------------------------------------------------------------------- geometry
@functools.lru_cache(maxsize=1)
def _fsaverage5() -> dict[str, np.ndarray]:
    from nilearn import datasets

    mesh = datasets.load_fsaverage("fsaverage5")["pial"]
    return {h: np.asarray(mesh.parts[h].coordinates, np.float32) for h in _HEMIS}


def _patch_mask(p: np.ndarray, j: np.ndarray) -> np.ndarray:
    x, y, z = p.T
    ax = np.abs(x)
    return ((y < -70 + j[0]) | ((y < -30 + j[1]) & (z < -4 + j[2]) & (ax > 15)) |
            ((y < -45 + j[3]) & (ax > 42) & (z < 10)) | ((y < -50 + j[4]) & (ax < 18) & (z < 25)))


def _polar_angle(label: int, psi: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Visual-field polar angle (deg) of chart elevation ``psi`` inside wedge (lo, hi) of ``label``."""
    t = (psi - lo) / (hi - lo)  # 0 at lo, 1 at hi
    if label == 1:    # V1v: horizontal meridian at psi = 0 (hi), upper vertical at lo
        return 90.0 * (1 - t)
    if label == 2:    # V1d: horizontal at 0 (lo), lower vertical at hi
        return -90.0 * t
    if label == 4:    # V2d: lower vertical at lo -> horizontal at hi
        return -90.0 * (1 - t)
    if label == 6:    # V3d: horizontal at lo -> lower vertical at hi
        return -90.0 * t
    if label == 3:    # V2v: horizontal at lo (-35) -> upper vertical at hi (-15)
        return 90.0 * t
    if label == 5:    # V3v: upper vertical at lo (-50) -> horizontal at hi (-35)
        return 90.0 * (1 - t)
    return 180.0 * t - 90.0  # hV4: -90 at lo .. +90 at hi (full hemifield)


def _prf_visibility(x: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Fraction of a 2-D Gaussian (deg) inside the image square of side FIELD_DEG."""
    h = FIELD_DEG / 2
    erf = np.vectorize(math.erf)
    fx = 0.5 * (erf((h - x) / (s * math.sqrt(2))) - erf((-h - x) / (s * math.sqrt(2))))
    fy = 0.5 * (erf((h - y) / (s * math.sqrt(2))) - erf((-h - y) / (s * math.sqrt(2))))
    return (fx * fy).astype(np.float32)


def _grid_ijk(coords: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Give each vertex its own voxel of VOLUME_SHAPE: the free voxel nearest to its position (greedy).

    Vertices are visited in order; a vertex whose nearest voxel is taken looks for the nearest free voxel
    within 3 voxels, then anywhere. Returns int64 (n_vertices, 3).
    """
    shape = np.array(VOLUME_SHAPE)
    if len(coords) > int(np.prod(shape)):
        raise ValueError(f"{len(coords)} vertices do not fit a {VOLUME_SHAPE} volume")
    pos = np.clip((coords - origin) / VOXEL_SIZE_MM, 0, shape - 1)
    free = np.ones(VOLUME_SHAPE, bool)
    out = np.zeros((len(coords), 3), np.int64)
    base = np.clip(np.rint(pos).astype(np.int64), 0, shape - 1)
    r = np.arange(-3, 4)
    offsets = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    for v in range(len(coords)):
        ijk = base[v]
        if not free[tuple(ijk)]:
            cand = base[v] + offsets
            cand = cand[((cand >= 0) & (cand < shape)).all(1)]
            cand = cand[free[tuple(cand.T)]]
            if len(cand) == 0:  # crowded: search the whole volume
                cand = np.argwhere(free)
            ijk = cand[np.argmin(((cand - pos[v]) ** 2).sum(1))]
        free[tuple(ijk)] = False
        out[v] = ijk
    return out


# ---------------------------------------------------------------------------------------------- observer
class Observer:
    """A simulated NSD subject: ROIs on fsaverage5, known tuning, noisy responses to MiniNSD scenes.

    Parameters
    ----------
    subject : int
        One of ``PAPER.nsd.subjects`` (1, 2, 5, 7).
    seed : int
        World seed; the subject's anatomy jitter and tuning come from ``seed_for("observer", subject,
        base_seed=seed)``.
    noise_sd : float
        Trial noise standard deviation, percent signal change.

    Attributes
    ----------
    n_voxels : int
    vertex_ids : dict {"left": int array, "right": int array}
        fsaverage5 vertex indices of the voxels of each hemisphere (voxels are ordered left, then right).
    hemisphere : np.ndarray of str, (n_voxels,)
        ``"left"`` or ``"right"``.
    vertex_index : np.ndarray, int64 (n_voxels,)
        fsaverage5 vertex index of each voxel within its hemisphere.
    coords_mm : np.ndarray, float32 (n_voxels, 3)
        Pial coordinates (mm).
    voxel_ijk : np.ndarray, int64 (n_voxels, 3)
        A unique voxel of a ``VOLUME_SHAPE`` grid for each voxel, near its pial position.
    affine : np.ndarray, float64 (4, 4)
        ijk -> mm for ``voxel_ijk`` (voxel size ``VOXEL_SIZE_MM``).
    tuning : Tuning
        Ground truth.
    """

    def __init__(self, subject: int, seed: int = 0, noise_sd: float = DEFAULT_NOISE_SD):
        # 1. Check inputs
        subjects = list(PAPER.nsd.subjects)
        if subject not in subjects:
            raise ValueError(f"'subject' must be one of {subjects}; {subject!r} was provided")
        if not noise_sd >= 0:
            raise ValueError(f"'noise_sd' must be >= 0; {noise_sd!r} was provided")
        self.subject = int(subject)
        self.seed = int(seed)
        self.noise_sd = float(noise_sd)
        rng = np.random.default_rng(seed_for("observer", self.subject, base_seed=self.seed))
        # 2. Patch of vertices
        surf = _fsaverage5()
        self.vertex_ids: dict[str, np.ndarray] = {}
        jitter = rng.uniform(-2, 2, size=(2, 5))
        for h, j in zip(_HEMIS, jitter):
            self.vertex_ids[h] = np.flatnonzero(_patch_mask(surf[h], j)).astype(np.int64)
        self.hemisphere = np.concatenate([np.full(len(self.vertex_ids[h]), h) for h in _HEMIS])
        self.vertex_index = np.concatenate([self.vertex_ids[h] for h in _HEMIS])
        self.coords_mm = np.concatenate([surf[h][self.vertex_ids[h]] for h in _HEMIS]).astype(np.float32)
        self.n_voxels = int(len(self.vertex_index))
        # 3. Retinotopy and category areas
        labels = {f: np.zeros(self.n_voxels, np.int32) for f in ROI_FILES}
        labels["nsdgeneral"][:] = 1
        area = np.full(self.n_voxels, "other", dtype=object)
        ecc = np.full(self.n_voxels, np.nan, np.float32)
        pa = np.full(self.n_voxels, np.nan, np.float32)
        self._retinotopy(rng, surf, labels, area, ecc, pa)
        self._category_areas(rng, labels, area)
        self._labels = labels
        # 4. Tuning
        self.tuning = self._make_tuning(rng, area.astype(str), ecc, pa)
        self._build_weights()
        # 5. Volume arrangement
        origin = np.array([-72.0, -108.0, -48.0], np.float32)
        self.voxel_ijk = _grid_ijk(self.coords_mm, origin)
        self.affine = np.diag([VOXEL_SIZE_MM, VOXEL_SIZE_MM, VOXEL_SIZE_MM, 1.0])
        self.affine[:3, 3] = origin

    # ------------------------------------------------------------------------------------------ anatomy
    def _retinotopy(self, rng, surf, labels, area, ecc, pa) -> None:
        A = _CHART_RADIUS / math.log(1 + _EMAX / _E2)
        for h in _HEMIS:
            sel = self.hemisphere == h
            pts = self.coords_mm[sel]
            pole = surf[h][np.argmin(surf[h][:, 1])] + rng.uniform(-2, 2, 3).astype(np.float32)
            d = pts - pole
            r = np.linalg.norm(d, axis=1)
            psi = np.degrees(np.arctan2(d[:, 2], np.hypot(d[:, 0], d[:, 1])))
            shift = rng.uniform(-2, 2)
            idx = np.flatnonzero(sel)
            vis_lab = np.zeros(len(idx), np.int32)
            for name, lab, lo, hi in _WEDGES:
                lo_j, hi_j = lo + (shift if lo != 0 else 0), hi + (shift if hi != 0 else 0)
                m = (r < _CHART_RADIUS) & (psi >= lo_j) & (psi < hi_j)
                vis_lab[m] = lab
                area[idx[m]] = name
                pa[idx[m]] = _polar_angle(lab, psi[m], lo_j, hi_j)
            inside = vis_lab > 0
            ecc[idx[inside]] = _E2 * (np.exp(r[inside] / A) - 1)
            labels["prf-visualrois"][idx] = vis_lab
        e = ecc[~np.isnan(ecc)]
        band = 1 + np.searchsorted(np.array(_ECC_EDGES), e, side="right")
        labels["prf-eccrois"][~np.isnan(ecc)] = band

    def _category_areas(self, rng, labels, area) -> None:
        free = labels["prf-visualrois"] == 0
        best = np.full(self.n_voxels, np.inf)
        owner = np.full(self.n_voxels, -1)
        for k, (name, cat, c, radius, hemis) in enumerate(_CATEGORY_ROIS):
            for h in hemis:
                sel = (self.hemisphere == h) & free
                if not sel.any():
                    continue
                centre = np.array(c, np.float32) * (np.array([-1, 1, 1]) if h == "right" else 1)
                centre = centre + rng.uniform(-3, 3, 3)
                idx = np.flatnonzero(sel)
                snap = self.coords_mm[idx[np.argmin(np.linalg.norm(self.coords_mm[idx] - centre, axis=1))]]
                rad = radius * rng.uniform(0.85, 1.15) * (1.15 if (cat == "face" and h == "right") else 1.0)
                d = np.linalg.norm(self.coords_mm[idx] - snap, axis=1)
                win = (d < rad) & (d < best[idx])
                best[idx[win]] = d[win]
                owner[idx[win]] = k
        for k, (name, cat, *_rest) in enumerate(_CATEGORY_ROIS):
            m = owner == k
            f = _FLOC_FILE[cat]
            value = {nm: v for v, nm in ROI_TABLES[f].items()}[name]
            labels[f][m] = value
            area[m] = {"face": "faces", "body": "bodies", "place": "places", "word": "words"}[cat]

    # ------------------------------------------------------------------------------------------- tuning
    def _make_tuning(self, rng, area, ecc, pa) -> Tuning:
        n = self.n_voxels
        prf_x = np.zeros(n, np.float32)
        prf_y = np.zeros(n, np.float32)
        size = np.zeros(n, np.float32)
        w = np.zeros((n, len(CHANNELS)), np.float32)
        preferred = np.full(n, "", dtype=object)
        sign = np.where(self.hemisphere == "left", 1.0, -1.0)  # left hemisphere sees the right field
        early = np.isin(area, list(_EARLY_WEIGHTS))
        rad = np.radians(pa[early])
        prf_x[early] = sign[early] * ecc[early] * np.cos(rad)
        prf_y[early] = ecc[early] * np.sin(rad)
        unsigned = [CHANNELS.index(c) for c in _UNSIGNED]
        for name, (a, b) in _PRF_SIZE.items():
            m = area == name
            size[m] = (a + b * ecc[m]) * rng.lognormal(0, 0.1, m.sum())
            w[np.ix_(m, unsigned)] = (np.array(_EARLY_WEIGHTS[name], np.float32)
                                      * rng.lognormal(0, 0.15, (m.sum(), len(unsigned))))
            preferred[m] = "object" if name == "hV4" else "texture"
        self._opponent_tuning(area, w)
        cat_areas = {"faces": ("face", 0.8, 1.5), "bodies": ("body", 1.2, 2.0), "words": ("word", 0.8, 1.5),
                     "places": ("place", 2.5, 3.0)}
        for name, (cat, e_mu, s_mu) in cat_areas.items():
            m = area == name
            k = int(m.sum())
            e = np.abs(rng.normal(0, e_mu, k))
            th = rng.uniform(0, np.pi, k) - np.pi / 2
            prf_x[m] = sign[m] * e * np.cos(th)
            prf_y[m] = e * np.sin(th)
            size[m] = s_mu + rng.uniform(0, 2.0, k)
            w[m, CHANNELS.index(cat)] = rng.lognormal(0, 0.15, k)
            w[m, CHANNELS.index("contrast_mid")] = 0.15
            preferred[m] = cat
        m = area == "other"
        k = int(m.sum())
        e = rng.uniform(0, 5, k)
        th = rng.uniform(-np.pi / 2, np.pi / 2, k)
        prf_x[m] = sign[m] * e * np.cos(th)
        prf_y[m] = e * np.sin(th)
        size[m] = 0.5 + 0.3 * e + rng.uniform(0, 1, k)
        w[np.ix_(m, unsigned)] = rng.dirichlet(np.full(len(unsigned), 0.5), k).astype(np.float32)
        top = np.argmax(w[m], axis=1)
        preferred[m] = np.array([CHANNELS[t] if t >= N_PIXEL_CHANNELS else "" for t in top], dtype=object)
        vis = _prf_visibility(prf_x, prf_y, size)
        gain = rng.lognormal(0, 0.3, n).astype(np.float32)
        baseline = rng.normal(0.5, 0.3, n).astype(np.float32)
        return Tuning(area=area.astype(str), preferred=preferred.astype(str), prf_x=prf_x, prf_y=prf_y,
                      prf_size=size, eccentricity=ecc, polar_angle=pa, weights=w, gain=gain, baseline=baseline,
                      visibility=vis)

    def _opponent_tuning(self, area: np.ndarray, w: np.ndarray) -> None:
        """Fill V1-hV4's opponent-channel weights in ``w`` (n_voxels, len(CHANNELS)) in place: per voxel a random
        luminance sign and preferred hue, magnitudes :data:`_OPPONENT_WEIGHTS`. Drawn from a generator of their
        own, so the rest of the tuning is what it was before the opponent channels existed."""
        rng = np.random.default_rng(seed_for("observer-opponent", self.subject, base_seed=self.seed))
        lum, rg, by = (CHANNELS.index(c) for c in OPPONENT_CHANNELS)
        for name, (a_lum, a_col) in _OPPONENT_WEIGHTS.items():
            m = np.flatnonzero(area == name)
            hue = rng.uniform(0, 2 * np.pi, len(m))
            w[m, lum] = a_lum * rng.choice([-1.0, 1.0], len(m))
            w[m, rg] = a_col * np.cos(hue)
            w[m, by] = a_col * np.sin(hue)

    def _build_weights(self) -> None:
        """Linear map from flattened features (C*GRID*GRID) to drive, and reference standardisation."""
        t = self.tuning
        centres = ((np.arange(GRID) + 0.5) / GRID - 0.5) * FIELD_DEG  # deg, x right
        gx, gy = np.meshgrid(centres, -centres)  # grid row 0 is the top of the image: y up
        cell = (FIELD_DEG / GRID) ** 2
        d2 = (gx.reshape(1, -1) - t.prf_x[:, None]) ** 2 + (gy.reshape(1, -1) - t.prf_y[:, None]) ** 2
        prf = np.exp(-d2 / (2 * t.prf_size[:, None] ** 2)) * cell / (2 * np.pi * t.prf_size[:, None] ** 2)
        wc = t.weights * channel_scale()[None, :]
        W = (wc[:, :, None] * prf[:, None, :]).reshape(self.n_voxels, -1)  # (n_voxels, C*G*G)
        self._W = np.ascontiguousarray(W.T.astype(np.float32))  # (C*G*G, n_voxels)
        self._W64 = self._W.astype(np.float64)  # what responses() accumulates with (see there)
        ref = reference_features()
        ref = ref.reshape(len(ref), -1) @ self._W
        self._drive_mean = ref.mean(0).astype(np.float32)
        std = ref.std(0)
        self._drive_std = np.where(std > 0, std, 1.0).astype(np.float32)
        lrng = np.random.default_rng(seed_for("observer-noise-loading", self.subject, base_seed=self.seed))
        self._noise_loading = lrng.uniform(0.5, 1.5, self.n_voxels).astype(np.float32)

    # ------------------------------------------------------------------------------------------- public
    def roi_labels(self) -> dict[str, np.ndarray]:
        """NSD-style ROI labels per voxel: ``{file name: int32 (n_voxels,)}`` with :data:`ROI_TABLES` values.

        Keys: ``"prf-visualrois"``, ``"prf-eccrois"``, ``"floc-faces"``, ``"floc-bodies"``, ``"floc-places"``,
        ``"floc-words"``, ``"nsdgeneral"``; 0 = voxel in no ROI of that file.
        """
        return {k: v.copy() for k, v in self._labels.items()}

    def responses(self, scenes: Sequence[Scene] | np.ndarray, rng: np.random.Generator | None = None,
                  seeds: Iterable[int] | None = None, noise: bool = True) -> np.ndarray:
        """Responses to scenes, percent-signal-change-like.

        Parameters
        ----------
        scenes : sequence of Scene, or np.ndarray (n_scenes, len(CHANNELS), GRID, GRID)
            Scenes, or their :func:`scene_features` (compute those once when simulating several subjects).
        rng : np.random.Generator, optional
            Source of the trial noise for the whole batch.
        seeds : iterable of int, optional
            One seed per scene (e.g. ``seed_for("trial", i)``): each row's noise depends only on its seed
            and the subject, whatever the batch. Exactly one of ``rng``/``seeds`` is needed when ``noise``.
        noise : bool
            False returns the noise-free response.

        Returns
        -------
        np.ndarray, float32, shape (n_scenes, n_voxels)
        """
        feats = scenes if isinstance(scenes, np.ndarray) else scene_features(scenes)
        expected = (len(CHANNELS), GRID, GRID)
        if feats.ndim != 4 or feats.shape[1:] != expected:
            raise ValueError(f"'scenes' features must have shape (n_scenes, {expected}); {feats.shape} was found")
        n = feats.shape[0]
        t = self.tuning
        # accumulated in float64, then rounded: a float32 GEMM's last bits depend on the batch's shape and the
        # BLAS kernel the CPU takes (AMD vs Intel, thread count), and each row must be the same number whether
        # it is computed alone, per trial, or once per image in a batch (the world build relies on it)
        drive = (feats.reshape(n, -1).astype(np.float64) @ self._W64).astype(np.float32)
        z = (drive - self._drive_mean) / self._drive_std
        out = t.baseline + (t.gain * t.visibility) * z
        if not noise:
            return out.astype(np.float32)
        return self.add_noise(out, rng=rng, seeds=seeds)

    def add_noise(self, mean: np.ndarray, rng: np.random.Generator | None = None,
                  seeds: Iterable[int] | None = None) -> np.ndarray:
        """Trial responses from noise-free ones: ``responses(f, seeds=s) == add_noise(responses(f, noise=False),
        seeds=s)``, the same numbers (noise-free responses are per image, so a design that shows each image
        several times computes them once and indexes them per trial).

        mean : float32 (n, n_voxels), rows of ``responses(..., noise=False)``. rng / seeds as in
        :meth:`responses` (exactly one). Returns float32 (n, n_voxels).
        """
        out = np.asarray(mean)
        if out.dtype != np.float32 or out.ndim != 2 or out.shape[1] != self.n_voxels:
            raise ValueError(f"'mean' must be float32 (n, {self.n_voxels}); {out.dtype} {out.shape} was provided")
        n = out.shape[0]
        if (rng is None) == (seeds is None):
            raise ValueError("with noise=True exactly one of 'rng' or 'seeds' must be given; "
                             f"got rng={'set' if rng is not None else None}, "
                             f"seeds={'set' if seeds is not None else None}")
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            if len(seeds) != n:
                raise ValueError(f"'seeds' must have one seed per scene ({n}); {len(seeds)} were provided")
            e = np.empty((n, self.n_voxels + 1), np.float32)
            for i, s in enumerate(seeds):
                e[i] = np.random.default_rng([s, self.subject, self.seed]).standard_normal(self.n_voxels + 1)
        else:
            e = rng.standard_normal((n, self.n_voxels + 1), dtype=np.float32)
        eps = (math.sqrt(1 - _NOISE_RHO) * e[:, :-1] + math.sqrt(_NOISE_RHO) * self._noise_loading * e[:, -1:])
        return (out + self.noise_sd * eps).astype(np.float32)

    def ncsnr(self, scenes: Sequence[Scene] | np.ndarray) -> np.ndarray:
        """NSD's noise-ceiling SNR per voxel (Allen et al. 2022): sd of the noise-free responses over ``scenes``
        over the sd of the trial noise. float32 (n_voxels,); the noise ceiling of the mean of n trials is
        ``100 * ncsnr^2 / (ncsnr^2 + 1/n)`` percent. Trial noise sd of a voxel: ``noise_sd * sqrt((1 - rho) +
        rho * loading^2)`` (:meth:`add_noise`). Without noise (``noise_sd = 0``) a voxel with any signal is inf.
        """
        signal = self.responses(scenes, noise=False).astype(np.float64).std(0)
        noise = self.noise_sd * np.sqrt((1 - _NOISE_RHO) + _NOISE_RHO * self._noise_loading.astype(np.float64) ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(signal > 0, signal / noise, 0.0).astype(np.float32)

    def __repr__(self) -> str:
        return f"Observer(subject={self.subject}, seed={self.seed}, n_voxels={self.n_voxels})"
