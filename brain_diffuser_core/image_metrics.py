"""The pure metric functions of :mod:`brain_diffuser_core.metrics` on numpy arrays: input checks, resizing, the
pixel metrics (PixCorr, SSIM in 2-D and the paper's 1-D columns) and the feature metrics (Pearson matrices,
2-way identification, correlation distance). Images are uint8 ``(n, H, W, 3)``, features float32 ``(n, d)``.
Import them from :mod:`brain_diffuser_core.metrics` (which re-exports them).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .config import PAPER

#: skimage's ``rgb2gray`` weights (ITU-R BT.709 luma), used by the paper's SSIM.
GREY_WEIGHTS = (0.2125, 0.7154, 0.0721)
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
