"""The judges and the decoder-level check of ``world validate`` (see :mod:`.validate` for how they are used).

* :class:`ObserverJudge`: the ground-truth judge. Pixels -> the observer's input channels (the low-level ones
  computed exactly, the category-coverage ones estimated by a :class:`CoverageModel`) -> the observers'
  noise-free responses -> calibrated z-scores of the category areas (:data:`CATEGORY_ROIS`) -> argmax.
* :class:`ClipJudge`: nearest category centroid (cosine) in an image-embedding space (the bundle's CLIP).
* :class:`DecodedCategoryCheck`: nearest category centroid of decoded CLIP features (:data:`DECODED_FEATURES`),
  before any image is generated; separates decoder faults from generator faults.
* :func:`world_calibration_scenes`: the world's train scenes (with their graphs) that fit and calibrate them.

The third judge, "independent" (an ImageNet network and a linear probe), lives in :mod:`.judge`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..seeding import seed_for
from .measures import as_uint8_batch, to_world_size
from .scenes import CATEGORIES, IMAGE_SIZE, Scene

__all__ = [
    "CATEGORY_ROIS",
    "JUDGES",
    "DECODED_FEATURES",
    "CoverageModel",
    "ObserverJudge",
    "ClipJudge",
    "DecodedCategoryCheck",
    "world_calibration_scenes",
]

#: category ROI -> the scene category it prefers (MiniNSD's observer tuning)
CATEGORY_ROIS: Mapping[str, str] = {"faces": "face", "bodies": "body", "places": "place", "words": "word"}
#: the judges: "independent" (ImageNet EfficientNet-Lite0 + a linear probe on fresh scenes, :mod:`.judge`;
#: played no part in training or selecting any model), "observer" (the world's tuning), "clip" (bundle's CLIP)
JUDGES: tuple[str, ...] = ("independent", "observer", "clip")
#: decoded features checked at the decoder level, and their summary columns
DECODED_FEATURES: Mapping[str, str] = {"clip_text": "decoded_text_category",
                                       "clip_vision": "decoded_vision_category"}
#: rows of descriptors per chunk when fitting the coverage model
_FIT_ROWS = 16384


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
        """float32 (n * GRID * GRID, D) cell descriptors of uint8 (n, 64, 64, 3) images; ``low``: their
        :func:`~.observer.scene_features` when already computed (only the contrast channels are used)."""
        from .channels import CHANNELS, GRID, OPPONENT_CHANNELS, scene_features

        imgs = to_world_size(images)
        # only the channels before the opponent colour ones (three contrast bands and saturation): those are
        # linear in the cell's RGB means, which the descriptor holds already
        n_contrast = CHANNELS.index(OPPONENT_CHANNELS[0])
        low = (scene_features(_pixel_scenes(imgs)) if low is None else low)[:, :n_contrast]
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
        from .channels import CHANNELS, N_PIXEL_CHANNELS, scene_features

        if len(scenes) < 2:
            raise ValueError(f"'scenes' must hold at least 2 scenes to fit the coverage model; {len(scenes)} given")
        truth = scene_features(scenes)
        imgs = np.stack([s.image for s in scenes])
        x = cls.descriptors(imgs, truth)
        y = truth[:, N_PIXEL_CHANNELS:].transpose(0, 2, 3, 1).reshape(x.shape[0], len(CHANNELS) - N_PIXEL_CHANNELS)
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
        from .channels import GRID, N_PIXEL_CHANNELS, scene_features

        imgs = to_world_size(images)
        low = scene_features(_pixel_scenes(imgs))
        x = self.descriptors(imgs, low)
        cov = np.clip(self._random_features(x) @ self.weights, 0.0, 1.0)
        low[:, N_PIXEL_CHANNELS:] = cov.reshape(len(imgs), GRID, GRID, -1).transpose(0, 3, 1, 2)
        return low


class ObserverJudge:
    """Judge an image's category by the noise-free response of the observers' category areas.

    Rule (see the :mod:`.validate` module docstring): pixels -> observer channels (coverage estimated by a
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
        imgs = as_uint8_batch(images)
        if len(labels) != len(imgs):
            raise ValueError(f"'labels' must hold one category per image ({len(imgs)}); {len(labels)} were provided")
        cats = [c for c in CATEGORIES if c in set(labels)] + sorted(set(labels) - set(CATEGORIES))
        e = cls._unit(embed(imgs))
        lab = np.asarray(labels)
        centroids = np.stack([e[lab == c].mean(0) for c in cats])
        return cls(embed, cls._unit(centroids), cats)

    def classify(self, images) -> list[str]:
        e = self._unit(self.embed(as_uint8_batch(images)))
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


# --------------------------------------------------------------------------------------------- CLIP
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
