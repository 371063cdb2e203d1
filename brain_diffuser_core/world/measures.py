"""Image statistics that score generated scenes in the MiniNSD world's terms (``world validate``).

Each takes uint8 RGB images (n, H, W, 3) (a single (H, W, 3) image is read as n = 1); the measures work on
the grey image (Rec. 601 weights, [0, 1]) or the 0-255 RGB values:

* :func:`to_world_size`: resize to the world's 64 px (every generated image is scored at that size);
* :func:`hf_energy_fraction`: fraction of spectral power above :data:`HF_CUTOFF_CPD` cycles per degree;
* :func:`colourfulness`: Hasler & Suesstrunk (2003);
* :func:`contrast_centroid_deg`: radial centre of mass (degrees) of local contrast energy, and
  :func:`differential_contrast_centroids`, its noise-robust form over eccentricity bands.

Degrees are in the world's ``FIELD_DEG`` (8.4 deg) field. Nothing here knows about observers, judges or bundles
(:mod:`.validate_judges`, :mod:`.validate`).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .scenes import FIELD_DEG, IMAGE_SIZE

__all__ = [
    "HF_CUTOFF_CPD",
    "CONTRAST_SIGMA_DEG",
    "to_world_size",
    "hf_energy_fraction",
    "colourfulness",
    "rms_contrast",
    "contrast_centroid_deg",
    "differential_contrast_centroids",
]

#: spatial frequency (cycles per degree) above which spectral power counts as "high" (Nyquist of the 64 px
#: world image over 8.4 deg is 3.8 cpd)
HF_CUTOFF_CPD = 1.5
#: Gaussian sigma (degrees) of the blur subtracted to get local contrast for the eccentricity centroid
CONTRAST_SIGMA_DEG = 0.15
#: Rec. 601 luma weights (R, G, B)
_GREY = np.array([0.299, 0.587, 0.114], np.float32)


def as_uint8_batch(images, what: str = "images") -> np.ndarray:
    """One image (H, W, 3) or a batch (n, H, W, 3) of uint8 RGB as a batch (n, H, W, 3); a clear error naming
    ``what`` otherwise."""
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

    a = as_uint8_batch(images)
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
    a = as_uint8_batch(images).astype(np.float32) / 255.0
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
    a = as_uint8_batch(images).astype(np.float32)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    rg = (r - g).reshape(len(a), -1)
    yb = (0.5 * (r + g) - b).reshape(len(a), -1)
    std = np.sqrt(rg.std(1) ** 2 + yb.std(1) ** 2)
    mean = np.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)
    return (std + 0.3 * mean).astype(np.float32)


def rms_contrast(images) -> np.ndarray:
    """RMS contrast of uint8 RGB images: sd of the Rec. 601 grey image over its pixels, 0-255 levels, float32 (n,)."""
    grey = as_uint8_batch(images).astype(np.float32) @ _GREY
    return grey.reshape(len(grey), -1).std(1).astype(np.float32)


def _contrast_energy(images, field_deg: float, sigma_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Local contrast energy float32 (n, h, w) and each pixel's eccentricity in degrees (h, w)."""
    a = as_uint8_batch(images).astype(np.float32) / 255.0
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
    """Noise-robust eccentricity of each band's scenes: where its contrast lies that the other bands' does not.

    For each band, the local contrast energy (:func:`contrast_centroid_deg`) of its images is averaged over
    seeds and over rings ``ring_deg`` wide around the image centre (a radial profile: the mean energy per
    ring). The bands' mean profile ``c`` is fitted to each band's profile ``p`` by least squares over the rings
    (``a = <p, c> / <c, c>``) and subtracted (``p - a c``); the centre of mass (degrees, ring centres weighted
    by the positive part) is returned, NaN where nothing is left. What every band's scenes share (the
    generator's own texture or pixel noise, a frame, a horizon) cancels, i.i.d. noise averages out over the
    seeds and the pixels of a ring, and a band's value depends on where its contrast is, not on how much
    there is. Needs >= 2 bands.

    Why the fitted ``a``: the form before 2026-12-04 subtracted ``c`` itself, so a band with less contrast
    overall sat below the mean at every ring and read NaN or an arbitrary ring; it did so for the foveal
    bands' own top-driving training images of the MiniNSD world (``benchmarks/demo_eccentricity.py``).
    """
    if len(images_by_band) < 2:
        raise ValueError(f"'images_by_band' must hold >= 2 bands; {list(images_by_band)} was provided")
    profiles, centres = {}, None
    for band, imgs in images_by_band.items():
        e, r = _contrast_energy(imgs, field_deg, sigma_deg)
        ring = np.minimum((r / ring_deg).astype(np.int64), int(r.max() / ring_deg)).ravel()
        count = np.bincount(ring)
        energy = np.bincount(ring, weights=e.mean(0).ravel().astype(np.float64), minlength=len(count))
        profiles[band] = energy / np.maximum(count, 1)
        centres = (np.arange(len(count)) + 0.5) * ring_deg
    common = np.mean(list(profiles.values()), axis=0)
    norm = float(common @ common)
    out = {}
    for band, prof in profiles.items():
        scale = float(prof @ common) / norm if norm > 0 else 0.0
        d = np.clip(prof - scale * common, 0.0, None)
        # 0 <= d <= prof (scale >= 0), so a residual below rounding of the profile is nothing left
        out[band] = float((d * centres).sum() / d.sum()) if d.sum() > 1e-12 * prof.sum() else float("nan")
    return out
