"""In-silico validation of ROI-optimal scenes on the MiniNSD world (``world validate``).

Brain-Diffuser's ROI-optimal scenes (PAPER.md, "ROI-optimal scenes") feed a synthetic pattern (1 inside an
ROI, 0 elsewhere) through a subject's decoders and generate an image. On real NSD one can only look at the
pictures; in the MiniNSD world the observers' tuning is known, so the pictures can be scored:

* **category ROIs** (faces, bodies, places, words): the fraction of generated images whose content is the
  ROI's preferred category, by two judges:

  - ``observer`` (the ground-truth judge). The observer's category channels come from a scene's *graph*
    (object boxes), which a generated image does not have. The judge therefore estimates them from pixels
    with a :class:`CoverageModel` (ridge regression from per-cell colour / contrast descriptors to the five
    coverage maps, fitted on the world's training images and their graphs). The low-level channels are
    computed exactly (:func:`~brain_diffuser_core.world.observer.scene_features`). These channels go through
    the observer's noise-free response; each category ROI (area ``faces``, ``bodies``, ``places``,
    ``words``) gives its mean response over its voxels; each mean is z-scored with its mean and standard
    deviation over the same calibration images (so that an ROI with a large baseline or gain does not win
    by default); the image is judged to be of the category whose ROI has the largest z-score. For the
    subject average the z-scores of the subjects' observers are averaged first. Chance is 1/4.
    The judge can be biased on images unlike the world's (e.g. untrained models' noise is mostly judged
    "word": fine contrast): the summary therefore also gives, per category ROI, the fraction of the OTHER
    ROIs' scenes judged as that category (``<judge>_other_rois_fraction``); a preferred fraction means
    something only well above it.
  - ``clip``: nearest centroid (cosine) in the bundle CLIP's image-embedding space, centroids = mean
    normalised embedding of the calibration images of each of the world's six categories. Chance 1/6.
    Only when the bundle's CLIP towers can be loaded.

* **decoder level** (separates decoder faults from generator faults): before any image is generated, the
  ROI pattern's predicted CLIP features (:meth:`~brain_diffuser_core.pipeline.BrainDiffuser.pattern_features`,
  the subject average averaging them) are classified by :class:`DecodedCategoryCheck`: nearest category
  centroid (cosine) among the world's six categories, separately for ``clip_text`` (77 x D, flattened) and
  ``clip_vision`` (257 x D, flattened). Centroids are the bundle CLIP's features of the calibration scenes
  (``text_embeddings_batch`` of their captions, ``vision_embeddings`` of their images) with the mean over all
  calibration items subtracted, averaged per category. Summary columns ``decoded_text_category`` and
  ``decoded_vision_category`` ("n/a" when the bundle's CLIP does not load, as for the clip judge); for a
  category ROI the aims say whether the decoded text category is the preferred one. A category ROI whose
  decoded features already point elsewhere has a decoder (or feature) fault; one whose decoded features are
  right but whose images are judged wrong has a generator fault. (Measured on the cached demo bundle fitted
  on ``assets/demo/models``, 600 calibration scenes, each of its 4 subjects and the average alike: text
  features of faces / bodies / places / words / V1 / V4 nearest face / body / place / word / texture /
  object; vision features weaker: face, body, then body for places, words, V1 and V4.)
* **V1 vs V4**: high-spatial-frequency energy (:func:`hf_energy_fraction`) and colourfulness
  (:func:`colourfulness`, Hasler & Suesstrunk 2003). Aim: V1 scenes carry more high-frequency energy.
* **eccentricity bands**: radial centre of mass of contrast energy (:func:`contrast_centroid_deg`, degrees
  in the world's 8.4 deg field), and its noise-robust form (:func:`differential_contrast_centroids`: the
  seed-averaged contrast map of a band minus the mean over the bands, so what all bands' scenes share, the
  generator's own texture and noise included, cancels). Aim: each moves outward band by band.

Every generated image is resized to the world's 64 px before scoring (all ROIs alike). Nothing here claims
an aim is met: :meth:`ValidationReport.aims` computes each one from the numbers, and untrained demo models
are flagged in the report.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..io import atomic_path, atomic_write_json, to_jsonable
from ..rois import PAPER_ROIS, roi_names, roi_spec
from ..seeding import seed_for
from .scenes import CATEGORIES, FIELD_DEG, IMAGE_SIZE, Scene

__all__ = [
    "CATEGORY_ROIS",
    "ECCENTRICITY_ROIS",
    "DEFAULT_ROIS",
    "HF_CUTOFF_CPD",
    "CONTRAST_SIGMA_DEG",
    "JUDGES",
    "to_world_size",
    "hf_energy_fraction",
    "colourfulness",
    "contrast_centroid_deg",
    "differential_contrast_centroids",
    "CoverageModel",
    "ObserverJudge",
    "ClipJudge",
    "DecodedCategoryCheck",
    "DECODED_FEATURES",
    "NOT_AVAILABLE",
    "ValidationReport",
    "validate_bundle",
    "ValidationPlan",
    "plan_validation",
    "generate_validation_images",
    "ValidationJudges",
    "fit_judges",
    "score_validation",
    "world_calibration_scenes",
]

#: category ROI -> the scene category it prefers (MiniNSD's observer tuning)
CATEGORY_ROIS: Mapping[str, str] = {"faces": "face", "bodies": "body", "places": "place", "words": "word"}
#: the five NSD eccentricity bands, inner to outer
ECCENTRICITY_ROIS: tuple[str, ...] = tuple(roi_names("eccentricity"))
#: the paper's 8 ROIs and the 5 eccentricity bands
DEFAULT_ROIS: tuple[str, ...] = tuple(PAPER_ROIS) + ECCENTRICITY_ROIS
#: spatial frequency (cycles per degree) above which spectral power counts as "high" (Nyquist of the 64 px
#: world image over 8.4 deg is 3.8 cpd)
HF_CUTOFF_CPD = 1.5
#: Gaussian sigma (degrees) of the blur subtracted to get local contrast for the eccentricity centroid
CONTRAST_SIGMA_DEG = 0.15
#: the judges: "independent" (ImageNet EfficientNet-Lite0 + a linear probe on fresh scenes, :mod:`.judge`;
#: played no part in training or selecting any model), "observer" (the world's tuning), "clip" (bundle's CLIP)
JUDGES: tuple[str, ...] = ("independent", "observer", "clip")
#: decoded features checked at the decoder level, and their summary columns
DECODED_FEATURES: Mapping[str, str] = {"clip_text": "decoded_text_category",
                                       "clip_vision": "decoded_vision_category"}
#: summary value when the decoder-level check could not run (the bundle's CLIP did not load)
NOT_AVAILABLE = "n/a"
#: subject label of the subject average
AVERAGE = "average"

ProgressFn = Callable[[str, int, int], None]
_GREY = np.array([0.299, 0.587, 0.114], np.float32)
_FIT_ROWS = 16384


# --------------------------------------------------------------------------------------------- images
def _check_images(images, what: str = "images") -> np.ndarray:
    a = np.asarray(images)
    if a.ndim == 3 and a.shape[-1] == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"'{what}' must be uint8 RGB images (n, H, W, 3); dtype {a.dtype} and shape "
                         f"{a.shape} were provided")
    return a


def to_world_size(images, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (n, H, W, 3) -> uint8 (n, size, size, 3), bicubic (antialiased when shrinking; PIL)."""
    from PIL import Image

    a = _check_images(images)
    if a.shape[1:3] == (size, size):
        return a.copy()
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in a])


def hf_energy_fraction(images, cutoff_cpd: float = HF_CUTOFF_CPD, field_deg: float = FIELD_DEG) -> np.ndarray:
    """Fraction of an image's spectral power above ``cutoff_cpd`` cycles per degree.

    The grey image (Rec. 601 weights, [0, 1]) minus its mean is multiplied by a 2-D Hann window (so the
    image borders add no spurious high frequencies) and Fourier transformed; the radial frequency of each
    coefficient in cycles per image is divided by ``field_deg``. Returns float32 (n,) in [0, 1]: power above
    the cutoff over all non-DC power; 0 for a flat image (no power at all).
    """
    a = _check_images(images).astype(np.float32) / 255.0
    n, h, w, _ = a.shape
    grey = a @ _GREY
    grey = grey - grey.mean(axis=(1, 2), keepdims=True)
    win = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    power = np.abs(np.fft.fft2(grey * win)) ** 2
    fy = np.fft.fftfreq(h) * h  # cycles per image
    fx = np.fft.fftfreq(w) * w
    cpd = np.hypot(fy[:, None], fx[None, :]) / float(field_deg)
    nondc = cpd > 0
    total = power[:, nondc].sum(axis=1)
    high = power[:, cpd > cutoff_cpd].sum(axis=1)
    return np.where(total > 1e-12, high / np.maximum(total, 1e-12), 0.0).astype(np.float32)


def colourfulness(images) -> np.ndarray:
    """Hasler & Suesstrunk (2003) colourfulness of uint8 RGB images, float32 (n,) (0 for grey images).

    ``rg = R - G``, ``yb = (R + G) / 2 - B`` on 0-255 values;
    ``M = sqrt(std_rg^2 + std_yb^2) + 0.3 * sqrt(mean_rg^2 + mean_yb^2)``.
    """
    a = _check_images(images).astype(np.float32)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    rg = (r - g).reshape(len(a), -1)
    yb = (0.5 * (r + g) - b).reshape(len(a), -1)
    std = np.sqrt(rg.std(1) ** 2 + yb.std(1) ** 2)
    mean = np.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)
    return (std + 0.3 * mean).astype(np.float32)


def _contrast_energy(images, field_deg: float, sigma_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Local contrast energy float32 (n, h, w) and each pixel's eccentricity in degrees (h, w)."""
    a = _check_images(images).astype(np.float32) / 255.0
    n, h, w, _ = a.shape
    grey = a @ _GREY
    from scipy import ndimage

    sigma_px = sigma_deg * w / float(field_deg)
    e = (grey - ndimage.gaussian_filter(grey, (0, sigma_px, sigma_px), mode="reflect")) ** 2
    ys = ((np.arange(h) + 0.5) / h - 0.5) * field_deg * h / w
    xs = ((np.arange(w) + 0.5) / w - 0.5) * field_deg
    return e.astype(np.float32), np.hypot(ys[:, None], xs[None, :]).astype(np.float32)


def contrast_centroid_deg(images, field_deg: float = FIELD_DEG, sigma_deg: float = CONTRAST_SIGMA_DEG) -> np.ndarray:
    """Radial centre of mass of local contrast energy, degrees from the image centre, float32 (n,).

    Local contrast energy ``e = (grey - G_sigma * grey)^2`` (grey in [0, 1], Gaussian sigma ``sigma_deg``,
    reflecting borders); each pixel's eccentricity ``r`` is its centre's distance from the image centre in
    degrees (image side = ``field_deg``). Returns ``sum(e * r) / sum(e)``; NaN for an image with no contrast.
    """
    e, r = _contrast_energy(images, field_deg, sigma_deg)
    tot = e.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (e * r).sum(axis=(1, 2)) / tot
    return np.where(tot > 1e-12, out, np.nan).astype(np.float32)


def differential_contrast_centroids(images_by_band: Mapping[str, np.ndarray], field_deg: float = FIELD_DEG,
                                    sigma_deg: float = CONTRAST_SIGMA_DEG, ring_deg: float = 0.3) -> dict[str, float]:
    """Noise-robust eccentricity of each band's scenes: where its contrast exceeds the bands' common contrast.

    For each band, the local contrast energy (:func:`contrast_centroid_deg`) of its images is averaged over
    seeds and over rings ``ring_deg`` wide around the image centre (a radial profile: the mean energy per
    ring); the mean profile over all bands is subtracted, and the centre of mass (degrees) of the positive
    part is returned (NaN where nothing is left). What every band's scenes share (the generator's own texture
    or pixel noise, a frame, a horizon) cancels, and i.i.d. noise averages out over the seeds and the pixels of
    a ring, so a band's value moves only with contrast it puts where the other bands do not. Needs >= 2 bands.
    """
    if len(images_by_band) < 2:
        raise ValueError(f"'images_by_band' must hold >= 2 bands; {list(images_by_band)} was provided")
    profiles, centres = {}, None
    for band, imgs in images_by_band.items():
        e, r = _contrast_energy(imgs, field_deg, sigma_deg)
        ring = np.minimum((r / ring_deg).astype(np.int64), int(r.max() / ring_deg)).ravel()
        count = np.bincount(ring)
        profiles[band] = np.bincount(ring, weights=e.mean(0).ravel(), minlength=len(count)) / np.maximum(count, 1)
        centres = (np.arange(len(count)) + 0.5) * ring_deg
    common = np.mean(list(profiles.values()), axis=0)
    out = {}
    for band, prof in profiles.items():
        d = np.clip(prof - common, 0.0, None)
        out[band] = float((d * centres).sum() / d.sum()) if d.sum() > 1e-12 else float("nan")
    return out


# --------------------------------------------------------------------------------------------- judges
def _pixel_scenes(images: np.ndarray) -> list[Scene]:
    """Scenes without a graph (so only the pixel-computable observer channels are non-zero)."""
    return [Scene(image=im, objects=[], category="texture", captions=[], seed=0) for im in images]


def _box(a: np.ndarray, k: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.uniform_filter(a, size=(1, 1, k, k), mode="nearest")


class CoverageModel:
    """Pixels -> the observer's five category-coverage channels (face, body, place, word, object).

    Per 16 x 16 grid cell, descriptors are the four low-level observer channels (fine / mid / coarse
    contrast, saturation) and the cell's mean R, G, B, each also box-averaged over 3 x 3 and 7 x 7 cells and
    over the whole image, the squares and cross-products of the cell's mean colour, and the cell's position
    (x, y, x^2, y^2, x*y, radius). The standardised descriptors go through ``n_features`` random Fourier
    features (Gaussian kernel, ``gamma``; fixed seed) and a ridge regression (alpha 1) maps those to the
    coverage of each category; predictions are clipped to [0, 1]. Fitted on scenes whose graphs are known.
    (Measured on 300 fitting scenes vs 120 other scenes: R^2 0.40 face, 0.20 body, 0.53 place, 0.78 word,
    0.41 object coverage; a plain linear ridge on the same descriptors reached 0.13 / 0.08 / 0.12 / 0.41 / 0.24.)
    """

    def __init__(self, weights: np.ndarray, mean: np.ndarray, scale: np.ndarray, projection: np.ndarray,
                 phase: np.ndarray):
        self.weights = np.asarray(weights, np.float32)  # (n_features, 5)
        self.mean = np.asarray(mean, np.float32)
        self.scale = np.asarray(scale, np.float32)
        self.projection = np.asarray(projection, np.float32)  # (D, n_features)
        self.phase = np.asarray(phase, np.float32)

    @staticmethod
    def descriptors(images: np.ndarray, low: np.ndarray | None = None) -> np.ndarray:
        """float32 (n * GRID * GRID, D) cell descriptors of uint8 (n, 64, 64, 3) images."""
        from .observer import GRID, scene_features

        imgs = to_world_size(images)
        if low is None:
            low = scene_features(_pixel_scenes(imgs))[:, :4]
        n = len(imgs)
        cell = IMAGE_SIZE // GRID
        rgb = imgs.astype(np.float32).reshape(n, GRID, cell, GRID, cell, 3).mean(axis=(2, 4)) / 255.0
        base = np.concatenate([low, rgb.transpose(0, 3, 1, 2)], axis=1)  # (n, 7, G, G)
        glob = np.broadcast_to(base.mean(axis=(2, 3), keepdims=True), base.shape)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        quad = np.stack([r * r, g * g, b * b, r * g, r * b, g * b], axis=1)
        c = (np.arange(GRID, dtype=np.float32) + 0.5) / GRID - 0.5
        yy, xx = np.meshgrid(c, c, indexing="ij")
        pos = np.stack([xx, yy, xx * xx, yy * yy, xx * yy, np.hypot(xx, yy)])
        pos = np.broadcast_to(pos[None], (n,) + pos.shape)
        feats = np.concatenate([base, _box(base, 3), _box(base, 7), glob, quad, pos], axis=1)
        return np.ascontiguousarray(feats.transpose(0, 2, 3, 1).reshape(n * GRID * GRID, -1), np.float32)

    def _random_features(self, x: np.ndarray) -> np.ndarray:
        return np.cos(((x - self.mean) / self.scale) @ self.projection + self.phase)

    @classmethod
    def fit(cls, scenes: Sequence[Scene], alpha: float = 1.0, n_features: int = 800,
            gamma: float = 0.02) -> "CoverageModel":
        """Fit on scenes with graphs (their true coverage channels are the targets)."""
        from .observer import CHANNELS, scene_features

        if len(scenes) < 2:
            raise ValueError(f"'scenes' must hold at least 2 scenes to fit the coverage model; {len(scenes)} given")
        truth = scene_features(scenes)
        imgs = np.stack([s.image for s in scenes])
        x = cls.descriptors(imgs, truth[:, :4])
        y = truth[:, 4:].transpose(0, 2, 3, 1).reshape(x.shape[0], len(CHANNELS) - 4)
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 1e-8, scale, 1.0)
        rng = np.random.default_rng(seed_for("coverage-model-features"))
        proj = rng.normal(0.0, math.sqrt(2 * gamma), (x.shape[1], int(n_features))).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, int(n_features)).astype(np.float32)
        model = cls(np.zeros((int(n_features), y.shape[1])), mean, scale, proj, phase)
        gram = alpha * np.eye(int(n_features))
        rhs = np.zeros((int(n_features), y.shape[1]))
        for s in range(0, len(x), _FIT_ROWS):  # chunks keep memory at _FIT_ROWS x n_features
            f = model._random_features(x[s:s + _FIT_ROWS]).astype(np.float64)
            gram += f.T @ f
            rhs += f.T @ y[s:s + _FIT_ROWS]
        model.weights = np.linalg.solve(gram, rhs).astype(np.float32)
        return model

    def features(self, images) -> np.ndarray:
        """The observer's input channels estimated from pixels: float32 (n, len(CHANNELS), GRID, GRID)."""
        from .observer import GRID, scene_features

        imgs = to_world_size(images)
        low = scene_features(_pixel_scenes(imgs))
        x = self.descriptors(imgs, low[:, :4])
        cov = np.clip(self._random_features(x) @ self.weights, 0.0, 1.0)
        low[:, 4:] = cov.reshape(len(imgs), GRID, GRID, -1).transpose(0, 3, 1, 2)
        return low


class ObserverJudge:
    """Judge an image's category by the noise-free response of the observers' category areas.

    Rule (see the module docstring): pixels -> observer channels (coverage estimated by a
    :class:`CoverageModel`) -> noise-free responses -> mean over each category area's voxels -> z-score with
    the calibration images' mean and standard deviation of that mean -> average the z-scores over the
    observers asked for -> argmax over ``faces``, ``bodies``, ``places``, ``words``.
    """

    categories: tuple[str, ...] = tuple(CATEGORY_ROIS.values())

    def __init__(self, observers: Mapping[int, object], coverage: CoverageModel,
                 calibration: Mapping[int, tuple[np.ndarray, np.ndarray]]):
        self.observers = dict(observers)
        self.coverage = coverage
        self.calibration = dict(calibration)
        self._areas = {s: [np.asarray(o.tuning.area) == roi for roi in CATEGORY_ROIS]
                       for s, o in self.observers.items()}

    @classmethod
    def fit(cls, observers: Mapping[int, object], scenes: Sequence[Scene]) -> "ObserverJudge":
        """Fit the coverage model on ``scenes`` and calibrate each observer on their pixels."""
        coverage = CoverageModel.fit(scenes)
        judge = cls(observers, coverage, {})
        feats = coverage.features(np.stack([s.image for s in scenes]))
        for s in judge.observers:
            raw = judge._area_means(s, feats)
            sd = raw.std(0)
            judge.calibration[s] = (raw.mean(0), np.where(sd > 1e-8, sd, 1.0))
        return judge

    def _area_means(self, subject: int, feats: np.ndarray) -> np.ndarray:
        resp = self.observers[subject].responses(feats, noise=False)
        return np.stack([resp[:, m].mean(1) if m.any() else np.zeros(len(resp), np.float32)
                         for m in self._areas[subject]], axis=1)

    def scores(self, images, subjects: Sequence[int] | None = None) -> np.ndarray:
        """Calibrated category-area z-scores, float32 (n, 4) in :attr:`categories` order, averaged over
        ``subjects`` (default: every observer of the judge)."""
        subjects = list(self.observers) if subjects is None else [int(s) for s in subjects]
        bad = [s for s in subjects if s not in self.observers]
        if bad or not subjects:
            raise ValueError(f"'subjects' must be a non-empty subset of {sorted(self.observers)}; "
                             f"{subjects} was provided")
        feats = self.coverage.features(images)
        z = [(self._area_means(s, feats) - self.calibration[s][0]) / self.calibration[s][1] for s in subjects]
        return np.mean(z, axis=0).astype(np.float32)

    def classify(self, images, subjects: Sequence[int] | None = None) -> list[str]:
        """The judged category of each image (one of :attr:`categories`)."""
        return [self.categories[i] for i in np.argmax(self.scores(images, subjects), axis=1)]


class ClipJudge:
    """Nearest-centroid category in an image-embedding space (cosine similarity).

    ``embed``: uint8 (n, H, W, 3) -> float (n, d), e.g. :class:`~brain_diffuser_core.metrics.ClipImageNetwork`.
    Centroids: mean unit-normalised embedding of each category's calibration images.
    """

    def __init__(self, embed: Callable[[np.ndarray], np.ndarray], centroids: np.ndarray, categories: Sequence[str]):
        self.embed = embed
        self.centroids = np.asarray(centroids, np.float32)
        self.categories = tuple(categories)

    @staticmethod
    def _unit(x) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    @classmethod
    def fit(cls, embed: Callable[[np.ndarray], np.ndarray], images, labels: Sequence[str]) -> "ClipJudge":
        labels = list(labels)
        imgs = _check_images(images)
        if len(labels) != len(imgs):
            raise ValueError(f"'labels' must hold one category per image ({len(imgs)}); {len(labels)} were provided")
        cats = [c for c in CATEGORIES if c in set(labels)] + sorted(set(labels) - set(CATEGORIES))
        e = cls._unit(embed(imgs))
        lab = np.asarray(labels)
        centroids = np.stack([e[lab == c].mean(0) for c in cats])
        return cls(embed, cls._unit(centroids), cats)

    def classify(self, images) -> list[str]:
        e = self._unit(self.embed(_check_images(images)))
        return [self.categories[i] for i in np.argmax(e @ self.centroids.T, axis=1)]


class DecodedCategoryCheck:
    """Nearest category centroid of decoded CLIP features (the decoder-level check).

    For each feature (``clip_text``, ``clip_vision``): items are flattened to vectors, the mean over the
    calibration items is subtracted, and a vector is labelled with the category whose centroid (the mean of
    that category's centred calibration vectors, unit-normalised) has the largest cosine similarity with it.

    means : feature -> float32 (d,) calibration mean; centroids : feature -> float32 (n_categories, d) unit
    rows; categories : the centroids' row labels.
    """

    def __init__(self, means: Mapping[str, np.ndarray], centroids: Mapping[str, np.ndarray],
                 categories: Sequence[str]):
        self.means = {k: np.asarray(v, np.float32) for k, v in means.items()}
        self.centroids = {k: np.asarray(v, np.float32) for k, v in centroids.items()}
        self.categories = tuple(categories)

    @classmethod
    def fit_features(cls, features: Mapping[str, np.ndarray], labels: Sequence[str]) -> "DecodedCategoryCheck":
        """Calibrate on features {name: (n, ...)} of n items with category ``labels`` (n,)."""
        labels = list(labels)
        lab = np.asarray(labels)
        cats = [c for c in CATEGORIES if c in set(labels)] + sorted(set(labels) - set(CATEGORIES))
        means, centroids = {}, {}
        for name, x in features.items():
            x = np.asarray(x, np.float32)
            if len(x) != len(labels):
                raise ValueError(f"'labels' must hold one category per item of {name!r} ({len(x)}); "
                                 f"{len(labels)} were provided")
            x = x.reshape(len(x), -1)
            means[name] = x.mean(0)
            c = np.stack([(x[lab == k] - means[name]).mean(0) for k in cats])
            centroids[name] = ClipJudge._unit(c)
        return cls(means, centroids, cats)

    @classmethod
    def fit(cls, extractor, scenes: Sequence[Scene], batch_size: int = 64) -> "DecodedCategoryCheck":
        """Calibrate on ``scenes`` with a :class:`~brain_diffuser_core.features.clip.ClipFeatureExtractor`:
        ``text_embeddings_batch`` of their captions (n, 77, D) and ``vision_embeddings`` of their images
        (n, 257, D), the spaces the bundle's decoders predict."""
        feats = {"clip_text": extractor.text_embeddings_batch([list(s.captions) or [""] for s in scenes]),
                 "clip_vision": extractor.vision_embeddings(np.stack([s.image for s in scenes]),
                                                            batch_size=batch_size)}
        return cls.fit_features(feats, [s.category for s in scenes])

    def scores(self, name: str, x) -> np.ndarray:
        """Cosine similarities float32 (n, n_categories) of centred items ``x`` (n, ...) of feature ``name``."""
        if name not in self.centroids:
            raise ValueError(f"'name' must be one of {sorted(self.centroids)}; {name!r} was provided")
        x = np.asarray(x, np.float32)
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.means[name].shape[0]:
            raise ValueError(f"{name!r} items must hold {self.means[name].shape[0]} values each (as calibrated); "
                             f"{x.shape[1]} were provided")
        return (ClipJudge._unit(x - self.means[name]) @ self.centroids[name].T).astype(np.float32)

    def classify(self, name: str, x) -> list[str]:
        """The nearest category of each item of ``x`` (n, ...) of feature ``name``."""
        return [self.categories[i] for i in np.argmax(self.scores(name, x), axis=1)]


def world_calibration_scenes(world_root, n_images: int = 600, split: str = "train") -> list[Scene]:
    """Up to ``n_images`` of the world's ``split`` images (regenerated from ``world/images.json`` seeds,
    category-balanced, evenly spaced), with their scene graphs."""
    from .scenes import generate_scene

    path = Path(world_root) / "world" / "images.json"
    if not path.is_file():
        raise FileNotFoundError(f"no MiniNSD ground truth at {path}; 'world_root' must be a built world "
                                "(python -m brain_diffuser_core world build)")
    recs = [r for r in json.loads(path.read_text())["images"] if r["split"] == split]
    if not recs:
        raise ValueError(f"{path} lists no {split!r} images")
    by_cat: dict[str, list] = {}
    for r in recs:
        by_cat.setdefault(r["category"], []).append(r)
    per = max(1, int(n_images) // len(by_cat))
    chosen = []
    for c in sorted(by_cat):
        rs = by_cat[c]
        idx = np.unique(np.linspace(0, len(rs) - 1, min(per, len(rs))).round().astype(int))
        chosen += [rs[i] for i in idx]
    return [generate_scene(int(r["seed"]), r["category"]) for r in chosen]


# --------------------------------------------------------------------------------------------- report
def _subject_label(s) -> str:
    return AVERAGE if s == AVERAGE else f"subj{int(s):02d}"


@dataclass
class ValidationReport:
    """Scores of ROI-optimal scenes.

    records : one dict per generated image: roi, subject ("subj01" ... or "average"), seed, key,
        observer (judged category), clip (judged category or None), preferred (the ROI's preferred category
        or None), hf_fraction, colourfulness, ecc_centroid_deg.
    images : (roi, subject label) -> uint8 (n_seeds, H, W, 3) the generated images (not serialised).
    n_voxels : (roi, subject label) -> voxels in the ROI (summed over subjects for the average).
    decoded : (roi, subject label) -> {"clip_text": category, "clip_vision": category}, the decoder-level
        check (:class:`DecodedCategoryCheck`); absent when the bundle's CLIP did not load.
    """

    rois: list[str]
    subjects: list[str]
    n_seeds: int
    judge: str
    records: list[dict] = field(default_factory=list)
    images: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    n_voxels: dict[tuple[str, str], int] = field(default_factory=dict)
    decoded: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    clip_note: str = ""
    decoded_note: str = ""
    independent_note: str = ""
    models_trained: bool | None = None
    settings: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ summaries
    def _rows(self, roi: str, subject: str) -> list[dict]:
        return [r for r in self.records if r["roi"] == roi and r["subject"] == subject]

    def summary(self) -> list[dict]:
        """One dict per (roi, subject): n, voxels, preferred fractions by judge, the decoder-level categories
        (``decoded_text_category``, ``decoded_vision_category``: a category or "n/a";
        ``decoded_text_is_preferred``: bool for category ROIs, else None), mean image measures."""
        out = []
        for roi in self.rois:
            for subj in self.subjects:
                rows = self._rows(roi, subj)
                if not rows:
                    continue
                pref = rows[0]["preferred"]
                row = {"roi": roi, "subject": subj, "n": len(rows), "n_voxels": self.n_voxels.get((roi, subj)),
                       "preferred": pref}
                others = [r for r in self.records if r["subject"] == subj and r["roi"] != roi]
                for j in JUDGES:
                    vals = [r.get(j) for r in rows if r.get(j) is not None]
                    row[f"{j}_preferred_fraction"] = (float(np.mean([v == pref for v in vals]))
                                                      if pref is not None and vals else None)
                    # the same judge on the other ROIs' scenes: how often it says this category anyway
                    ovals = [r.get(j) for r in others if r.get(j) is not None]
                    row[f"{j}_other_rois_fraction"] = (float(np.mean([v == pref for v in ovals]))
                                                       if pref is not None and ovals else None)
                    row[f"{j}_counts"] = {c: sum(v == c for v in vals) for c in sorted(set(vals))} if vals else {}
                dec = self.decoded.get((roi, subj), {})
                for feat, col in DECODED_FEATURES.items():
                    row[col] = dec.get(feat) or NOT_AVAILABLE
                text = row["decoded_text_category"]
                row["decoded_text_is_preferred"] = (text == pref if pref is not None and text != NOT_AVAILABLE
                                                    else None)
                for m in ("hf_fraction", "colourfulness", "ecc_centroid_deg"):
                    v = np.array([r[m] for r in rows], np.float64)
                    row[m] = float(np.nanmean(v)) if np.isfinite(v).any() else None
                    row[m + "_sd"] = float(np.nanstd(v)) if np.isfinite(v).any() else None
                out.append(row)
        return out

    def aims(self) -> list[dict]:
        """Each aim of the issue checked per subject label from the numbers: {aim, subject, value, target, met}."""
        summ = {(r["roi"], r["subject"]): r for r in self.summary()}
        out = []
        key = f"{self.judge}_preferred_fraction"
        for subj in self.subjects:
            for roi in CATEGORY_ROIS:
                r = summ.get((roi, subj))
                if r is None:
                    continue
                if r[key] is not None:
                    out.append({"aim": f"{roi}: >= 80% {CATEGORY_ROIS[roi]} scenes ({self.judge} judge) over >= 16 "
                                       "seeds",
                                "subject": subj, "value": r[key], "target": 0.8,
                                "other_rois_fraction": r[f"{self.judge}_other_rois_fraction"],
                                "category": CATEGORY_ROIS[roi],
                                "met": bool(r[key] >= 0.8 and r["n"] >= 16)})
                if r["decoded_text_is_preferred"] is not None:
                    out.append({"aim": f"{roi}: decoded CLIP-text features nearest the {CATEGORY_ROIS[roi]} "
                                       "centroid (decoder level)",
                                "subject": subj, "value": r["decoded_text_category"],
                                "target": CATEGORY_ROIS[roi], "met": bool(r["decoded_text_is_preferred"])})
            v1, v4 = summ.get(("V1", subj)), summ.get(("V4", subj))
            if v1 and v4 and v1["hf_fraction"] is not None and v4["hf_fraction"] is not None:
                out.append({"aim": "V1 scenes carry more high-frequency energy than V4 scenes", "subject": subj,
                            "value": {"V1": v1["hf_fraction"], "V4": v4["hf_fraction"]}, "target": "V1 > V4",
                            "met": bool(v1["hf_fraction"] > v4["hf_fraction"])})
            bands = [summ[(b, subj)]["ecc_centroid_deg"] for b in ECCENTRICITY_ROIS
                     if (b, subj) in summ and summ[(b, subj)]["ecc_centroid_deg"] is not None]
            if len(bands) >= 2:
                out.append({"aim": "contrast centroid moves outward band by band", "subject": subj,
                            "value": bands, "target": "strictly increasing",
                            "met": bool(all(b > a for a, b in zip(bands, bands[1:])))})
            band_images = {b: self.images[(b, subj)] for b in ECCENTRICITY_ROIS if (b, subj) in self.images}
            if len(band_images) >= 2:
                diff = list(differential_contrast_centroids(band_images).values())
                out.append({"aim": "differential contrast centroid (band minus the bands' mean, over seeds) moves "
                                   "outward band by band", "subject": subj, "value": diff,
                            "target": "strictly increasing",
                            "met": bool(np.all(np.isfinite(diff)) and all(b > a for a, b in zip(diff, diff[1:])))})
        return out

    # ------------------------------------------------------------------ output
    def format_table(self) -> str:
        """The printed table: one line per (roi, subject), then the aims."""
        def f(v, fmt):
            return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

        head = (f"{'roi':<8} {'subject':<8} {'n':>3} {'voxels':>6} {'pref':<6} {'indep':>6} {'observer':>8} {'clip':>6} "
                f"{'dec text':<8} {'dec vis':<8} {'HF frac':>8} {'colour':>7} {'ecc deg':>7}")
        lines = [head, "-" * len(head)]
        for r in self.summary():
            lines.append(f"{r['roi']:<8} {r['subject']:<8} {r['n']:>3} {f(r['n_voxels'], 'd'):>6} "
                         f"{r['preferred'] or '-':<6} {f(r['independent_preferred_fraction'], '.0%'):>6} "
                         f"{f(r['observer_preferred_fraction'], '.0%'):>8} "
                         f"{f(r['clip_preferred_fraction'], '.0%'):>6} {r['decoded_text_category']:<8} "
                         f"{r['decoded_vision_category']:<8} {f(r['hf_fraction'], '.3f'):>8} "
                         f"{f(r['colourfulness'], '.1f'):>7} {f(r['ecc_centroid_deg'], '.2f'):>7}")
        lines.append("dec text / dec vis: category nearest to the decoded CLIP-text / CLIP-vision features of the ROI "
                     "pattern (decoder level, before generation; n/a without the bundle's CLIP)")
        lines.append("")
        lines.append("aims (computed from the numbers above):")
        for a in self.aims():
            v = a["value"]
            if isinstance(v, float):
                vs = f"{v:.0%}"
                o = a.get("other_rois_fraction")
                if o is not None:
                    vs += f" (other ROIs' scenes judged {a['category']}: {o:.0%})"
            elif isinstance(v, str):
                vs = f"nearest {v}"
            elif isinstance(v, dict):
                vs = ", ".join(f"{k} {x:.3f}" for k, x in v.items())
            else:
                vs = " -> ".join(f"{x:.2f}" for x in v) + " deg"
            lines.append(f"  [{'MET' if a['met'] else 'not met'}] {a['subject']:<8} {a['aim']}: {vs}")
        if self.independent_note:
            lines.append(f"independent judge: {self.independent_note}")
        if self.clip_note:
            lines.append(f"clip judge: {self.clip_note}")
        if self.decoded_note:
            lines.append(f"decoder-level check: {self.decoded_note}")
        if self.models_trained is False:
            lines.append("NOTE: the bundle's generative models are UNTRAINED random demo models: these numbers "
                         "say nothing about Brain-Diffuser; train them with `world train`.")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"rois": self.rois, "subjects": self.subjects, "n_seeds": self.n_seeds, "judge": self.judge,
                "models_trained": self.models_trained, "clip_note": self.clip_note,
                "independent_note": self.independent_note,
                "decoded_note": self.decoded_note, "settings": self.settings,
                "rules": {"hf_cutoff_cpd": HF_CUTOFF_CPD, "contrast_sigma_deg": CONTRAST_SIGMA_DEG,
                          "field_deg": FIELD_DEG, "scored_size_px": IMAGE_SIZE},
                "summary": self.summary(), "aims": self.aims(), "records": self.records}

    def write(self, out_dir) -> dict[str, Path]:
        """Write report.json, per_seed.csv, summary.csv and sheets/<roi>.png (rows = subjects, columns =
        seeds) under ``out_dir``; returns {name: path}."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json", "per_seed": out / "per_seed.csv", "summary": out / "summary.csv"}
        atomic_write_json(paths["json"], to_jsonable(self.to_json()))
        cols = ["roi", "subject", "seed", "key", "preferred", "independent", "observer", "clip", "hf_fraction",
                "colourfulness",
                "ecc_centroid_deg"]
        _write_csv(paths["per_seed"], cols, self.records)
        summ = self.summary()
        scols = [c for c in summ[0] if not c.endswith("_counts")] if summ else ["roi"]
        _write_csv(paths["summary"], scols, summ)
        for roi in self.rois:
            rows = [(s, self.images[(roi, s)]) for s in self.subjects if (roi, s) in self.images]
            if rows:
                p = out / "sheets" / f"{_safe(roi)}.png"
                _contact_sheet(roi, rows, p)
                paths[f"sheet:{roi}"] = p
        return paths


def _safe(name: str) -> str:
    return name.replace("+", "plus").replace("/", "_")


def _write_csv(path: Path, cols: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _contact_sheet(roi: str, rows: list[tuple[str, np.ndarray]], path: Path, cell: int = 96) -> None:
    """PNG grid: one row per subject label (label on the left), one column per seed."""
    from PIL import Image, ImageDraw

    margin, top = 70, 18
    n_cols = max(len(imgs) for _, imgs in rows)
    sheet = Image.new("RGB", (margin + n_cols * cell, top + len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), f"ROI-optimal scenes: {roi}", fill=(0, 0, 0))
    for i, (label, imgs) in enumerate(rows):
        draw.text((4, top + i * cell + cell // 2 - 6), label, fill=(0, 0, 0))
        for j, im in enumerate(imgs):
            tile = Image.fromarray(np.asarray(im, np.uint8)).resize((cell, cell), Image.BICUBIC)
            sheet.paste(tile, (margin + j * cell, top + i * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


# --------------------------------------------------------------------------------------------- driver
def _load_clip(diffuser) -> tuple[object | None, str, str]:
    """The bundle's :class:`~brain_diffuser_core.features.clip.ClipFeatureExtractor`, or (None, why not, "")."""
    from ..features.clip import ClipFeatureExtractor

    where = diffuser.bundle.clip_location()
    if where is None:
        return None, "unavailable: the bundle names no CLIP model", ""
    try:
        extractor = ClipFeatureExtractor.from_pretrained(where, device=diffuser.device)
    except (OSError, ValueError) as err:
        return None, f"unavailable: the bundle's CLIP ({where}) could not be loaded ({str(err).splitlines()[0]})", ""
    return extractor, "", str(where)


def _load_clip_judge(diffuser, scenes: Sequence[Scene], extractor=None, where: str = ""
                     ) -> tuple["ClipJudge | None", str]:
    """A :class:`ClipJudge` on the bundle's CLIP image tower, or (None, why not)."""
    from ..metrics import ClipImageNetwork

    if extractor is None:
        extractor, why, where = _load_clip(diffuser)
        if extractor is None:
            return None, why
    net = ClipImageNetwork(extractor)
    judge = ClipJudge.fit(net, np.stack([s.image for s in scenes]), [s.category for s in scenes])
    return judge, f"nearest centroid over {len(judge.categories)} categories in the CLIP image space of {where}"


def _models_trained(bundle) -> bool | None:
    from .demo import TRAINED_KEY, UNTRAINED_KEY

    models = bundle.models
    if UNTRAINED_KEY in models:
        return False
    if TRAINED_KEY in models:
        return True
    return None


@dataclass
class ValidationPlan:
    """What a validation generates: per (roi, subject label), the subjects' ROI patterns, the members (the
    subjects whose predicted features are averaged), the generation name and the seeds.

    patterns : (roi, label) -> {subject: float32 (n_voxels,)}; seeds : (roi, label) -> [seed per k]."""

    world_root: str
    rois: list[str]
    subjects: list  # ints and/or "average", as given
    labels: list[str]
    n_seeds: int
    base_seed: int
    avg_members: list[int]
    needed: list[int]
    patterns: dict = field(default_factory=dict)
    seeds: dict = field(default_factory=dict)
    info: object = None

    def name(self, roi: str, label: str) -> str:
        return f"validate/{roi}/{label}"

    def keys(self) -> list[tuple[str, str]]:
        """(roi, label) in report order."""
        return [(roi, label) for roi in self.rois for label in self.labels]


def plan_validation(bundle, world_root, *, rois: Sequence[str] = DEFAULT_ROIS,
                    subjects: Sequence[int | str] | None = None, n_seeds: int = 16, judge: str = "independent",
                    base_seed: int = 0, cache_dir=None) -> ValidationPlan:
    """Check the inputs against ``bundle`` (a :class:`~brain_diffuser_core.bundle.Bundle`) and the world, and
    compute every (roi, subject)'s patterns and seeds (see :func:`validate_bundle`)."""
    from ..nsd import load_subject
    from .build import read_world_info

    if judge not in JUDGES:
        raise ValueError(f"'judge' must be one of {list(JUDGES)}; {judge!r} was provided")
    rois = list(rois)
    for r in rois:
        roi_spec(r)  # raises UnknownRoiError naming the catalogue
    if not rois:
        raise ValueError("'rois' must name at least one ROI; an empty list was provided")
    if int(n_seeds) < 1:
        raise ValueError(f"'n_seeds' must be >= 1; {n_seeds} was provided")
    info = read_world_info(world_root)
    bundle_subjects = bundle.subjects
    if subjects is None:
        subjects = list(bundle_subjects) + ([AVERAGE] if len(bundle_subjects) > 1 else [])
    subjects = [s if s == AVERAGE else int(s) for s in subjects]
    ints = [s for s in subjects if s != AVERAGE]
    bad = [s for s in ints if s not in bundle_subjects or s not in info.n_voxels]
    if bad or not subjects:
        raise ValueError(f"'subjects' must be a non-empty list among the bundle's and world's subjects "
                         f"{sorted(set(bundle_subjects) & set(info.n_voxels))} or 'average'; {subjects} was provided")
    avg_members = [s for s in bundle_subjects if s in info.n_voxels]
    needed = sorted(set(ints) | (set(avg_members) if AVERAGE in subjects else set()))
    subs = {s: load_subject(world_root, s, cache_dir=cache_dir, progress=False) for s in needed}
    for s, sub in subs.items():
        bundle.check_subject(s, sub.n_voxels, sub.mask_sha256)
    plan = ValidationPlan(world_root=str(world_root), rois=rois, subjects=subjects,
                          labels=[_subject_label(s) for s in subjects], n_seeds=int(n_seeds),
                          base_seed=int(base_seed), avg_members=avg_members, needed=needed, info=info)
    for roi in rois:
        per = {s: subs[s].synthetic_pattern({roi: 1.0}) for s in needed}
        for subj, label in zip(subjects, plan.labels):
            members = avg_members if subj == AVERAGE else [subj]
            plan.patterns[(roi, label)] = {s: per[s] for s in members}
            plan.seeds[(roi, label)] = [seed_for("pattern", plan.name(roi, label), k, base_seed=base_seed)
                                        for k in range(int(n_seeds))]
    return plan


def generate_validation_images(diffuser, plan: ValidationPlan, roi: str, label: str, seeds: Sequence[int], *,
                               run_stage2: bool = True, **overrides) -> list[np.ndarray]:
    """The scored images (final, or the upscaled stage 1 without stage 2) of (roi, label) for ``seeds``,
    generated as one batch."""
    recs = diffuser.reconstruct_pattern(plan.patterns[(roi, label)], name=plan.name(roi, label), seeds=list(seeds),
                                        run_stage2=run_stage2, **overrides)
    return [r.final if r.final is not None else r.stage1_upscaled for r in recs]


@dataclass
class ValidationJudges:
    """The judges fitted on the world (observer, independent, CLIP when it loads) and the decoder-level check."""

    observer: ObserverJudge
    independent: object
    clip: "ClipJudge | None"
    clip_note: str
    decoded: "DecodedCategoryCheck | None"
    decoded_note: str
    n_calibration: int


def fit_judges(diffuser, plan: ValidationPlan, *, judge: str = "independent", n_calibration: int = 600,
               judge_scenes: int = 200, cache_dir=None) -> ValidationJudges:
    """Fit the judges of :func:`validate_bundle` (``diffuser``: its bundle and device are used, not its
    generative models). Raises ValueError for judge "clip" when the bundle's CLIP does not load."""
    from ..config import cache_root
    from .judge import CategoryJudge
    from .observer import Observer

    info = plan.info
    observers = {s: Observer(s, seed=int(info.params["seed"]), noise_sd=float(info.params["noise_sd"]))
                 for s in plan.needed}
    scenes = world_calibration_scenes(plan.world_root, n_calibration)
    obs_judge = ObserverJudge.fit(observers, scenes)
    independent = CategoryJudge.cached(cache_dir if cache_dir is not None else cache_root(),
                                       n_per_category=judge_scenes,
                                       n_heldout_per_category=max(1, int(judge_scenes) // 4))
    extractor, why, where = _load_clip(diffuser)
    if extractor is not None:
        clip_judge, clip_note = _load_clip_judge(diffuser, scenes, extractor, where)
        decoded_check = DecodedCategoryCheck.fit(extractor, scenes)
        decoded_note = (f"nearest centred centroid (cosine) over {len(decoded_check.categories)} categories of "
                        f"{where}'s text / vision features of {len(scenes)} calibration scenes")
    else:
        clip_judge, clip_note, decoded_check, decoded_note = None, why, None, why
    if judge == "clip" and clip_judge is None:
        raise ValueError(f"judge 'clip' needs the bundle's CLIP towers; {clip_note}")
    return ValidationJudges(obs_judge, independent, clip_judge, clip_note, decoded_check, decoded_note, len(scenes))


def score_validation(diffuser, plan: ValidationPlan, judges: ValidationJudges, images: Mapping, *,
                     judge: str = "independent", run_stage2: bool = True, **overrides) -> ValidationReport:
    """The report of the generated ``images`` ((roi, label) -> uint8 (n_seeds, H, W, 3), seeds in plan
    order): every judge's labels, the image measures and the decoder-level check per (roi, label)."""
    report = ValidationReport(rois=plan.rois, subjects=list(plan.labels), n_seeds=plan.n_seeds,
                              judge=judge, clip_note=judges.clip_note, decoded_note=judges.decoded_note,
                              independent_note=judges.independent.describe(),
                              models_trained=_models_trained(diffuser.bundle),
                              settings={"base_seed": plan.base_seed, "run_stage2": bool(run_stage2),
                                        "n_calibration": judges.n_calibration, **overrides})
    for roi, label in plan.keys():
        pats = plan.patterns[(roi, label)]
        members = list(pats)
        report.n_voxels[(roi, label)] = int(sum(int(p.sum()) for p in pats.values()))
        if judges.decoded is not None:  # decoder level: the features the generator will be given
            feats = diffuser.pattern_features(pats)
            report.decoded[(roi, label)] = {k: judges.decoded.classify(k, feats[k])[0] for k in DECODED_FEATURES}
        imgs = np.stack(images[(roi, label)])
        report.images[(roi, label)] = imgs
        small = to_world_size(imgs)
        obs_labels = judges.observer.classify(small, members)
        ind_labels = judges.independent.classify(small)
        clip_labels = judges.clip.classify(imgs) if judges.clip is not None else [None] * len(imgs)
        hf, col, ecc = hf_energy_fraction(small), colourfulness(small), contrast_centroid_deg(small)
        name = plan.name(roi, label)
        for k, seed in enumerate(plan.seeds[(roi, label)]):
            report.records.append({
                "roi": roi, "subject": label, "seed": int(seed), "key": f"{name}/seed{seed}",
                "preferred": CATEGORY_ROIS.get(roi), "independent": ind_labels[k], "observer": obs_labels[k],
                "clip": clip_labels[k],
                "hf_fraction": float(hf[k]), "colourfulness": float(col[k]),
                "ecc_centroid_deg": None if not np.isfinite(ecc[k]) else float(ecc[k])})
    return report


def validate_bundle(
    diffuser,
    world_root,
    *,
    rois: Sequence[str] = DEFAULT_ROIS,
    subjects: Sequence[int | str] | None = None,
    n_seeds: int = 16,
    judge: str = "independent",
    progress: ProgressFn | None = None,
    n_calibration: int = 600,
    batch_size: int = 16,
    base_seed: int = 0,
    cache_dir=None,
    judge_scenes: int = 200,
    **overrides,
) -> ValidationReport:
    """Generate ROI-optimal scenes with ``diffuser`` and score them against the world's known tuning.

    Parameters
    ----------
    diffuser : :class:`~brain_diffuser_core.pipeline.BrainDiffuser` with decoders fitted on this world.
    world_root : path of the MiniNSD world (``build_world`` output).
    rois : catalogue ROI names (default: the paper's 8 and the 5 eccentricity bands).
    subjects : ints among the bundle's subjects and/or ``"average"`` (the paper's subject average: the mean of
        the predicted features of every bundle subject in the world); default: every bundle subject and
        ``"average"`` (when there are two or more).
    n_seeds : images per (roi, subject); seed ``k`` is ``seed_for("pattern", "validate/<roi>/<subject>", k,
        base_seed=base_seed)``.
    judge : "independent" (default), "observer" or "clip": which judge's fraction the category aims use. All
        are computed (the clip judge when the bundle's CLIP loads; "clip" fails when it does not).
    progress : callable(step, done, total) after each generated batch.
    n_calibration : world train images used to fit and calibrate the observer and CLIP judges.
    judge_scenes : fresh scenes per category that fit the independent judge (a quarter as many score it).
    batch_size : images generated at once.
    cache_dir : prepared-subject cache for :func:`~brain_diffuser_core.nsd.load_subject`; the independent
        judge's fitted probe is cached under it too (default: the app's cache).
    overrides : stage settings for generation (e.g. ``num_inference_steps=10``, ``run_stage2=False``).

    The ``world validate`` command runs the same steps with the generation on the batch layer
    (:mod:`brain_diffuser_core.batch.validate`): :func:`plan_validation`, :func:`fit_judges`,
    :func:`generate_validation_images` per batch of seeds, :func:`score_validation`.

    Returns
    -------
    ValidationReport
    """
    run_stage2 = bool(overrides.pop("run_stage2", True))
    plan = plan_validation(diffuser.bundle, world_root, rois=rois, subjects=subjects, n_seeds=n_seeds,
                           judge=judge, base_seed=base_seed, cache_dir=cache_dir)
    judges = fit_judges(diffuser, plan, judge=judge, n_calibration=n_calibration, judge_scenes=judge_scenes,
                        cache_dir=cache_dir)
    n_batches = math.ceil(int(n_seeds) / int(batch_size))
    total, done = len(plan.keys()) * n_batches, 0
    if progress is not None:
        progress("judges calibrated", 0, total)
    images = {}
    for roi, label in plan.keys():
        seeds = plan.seeds[(roi, label)]
        images[(roi, label)] = []
        for b in range(n_batches):
            chunk = seeds[b * batch_size:(b + 1) * batch_size]
            images[(roi, label)] += generate_validation_images(diffuser, plan, roi, label, chunk,
                                                               run_stage2=run_stage2, **overrides)
            done += 1
            if progress is not None:
                progress(f"{roi} {label}", done, total)
    return score_validation(diffuser, plan, judges, images, judge=judge, run_stage2=run_stage2, **overrides)
