"""What a MiniNSD observer sees of a scene: feature channels on a 16 x 16 grid over the 8.4 deg image.

:func:`scene_features` summarises each scene by the channels of :data:`CHANNELS`: local contrast energy in
three bands (fine: ``grey - G_0.8``; mid: ``G_1 - G_2.5``; coarse: ``G_2.5 - G_6``, sigma in 64-px pixels; RMS
per cell), colour saturation ``(max - min) / 255``, the local mean colour in an opponent space (luminance
``grey - 0.5``, red-green ``R - G``, blue-yellow ``B - (R + G) / 2``; signed) and per-category coverage of the
scene graph's objects (face, body, place, word, object: fraction of each cell inside the object's box). The
observers (:mod:`.observer`) weight these channels through their pRFs; :func:`channel_scale` puts every channel
on the same footing (mean magnitude 1 over :func:`reference_features`).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from scipy import ndimage

from .scenes import IMAGE_SIZE, Scene, generate_scenes, stack_images

__all__ = [
    "CHANNELS",
    "N_PIXEL_CHANNELS",
    "OPPONENT_CHANNELS",
    "GRID",
    "scene_features",
    "reference_features",
    "channel_scale",
]

#: Feature channels of :func:`scene_features`, in order: first the ones computed from pixels, then the
#: per-category coverage of the scene graph's objects.
CHANNELS: tuple[str, ...] = ("contrast_fine", "contrast_mid", "contrast_coarse", "saturation",
                             "luminance", "red_green", "blue_yellow",
                             "face", "body", "place", "word", "object")
#: how many of :data:`CHANNELS` (the first ones) are computed from pixels alone
N_PIXEL_CHANNELS = CHANNELS.index("face")
#: the signed channels: local mean colour in an opponent space (achromatic, red-green, blue-yellow)
OPPONENT_CHANNELS: tuple[str, ...] = ("luminance", "red_green", "blue_yellow")
#: Side of the pooling grid over the image.
GRID = 16

_REFERENCE_SEED = 20231
_N_REFERENCE = 120


def _block_mean(a: np.ndarray, g: int) -> np.ndarray:
    """Mean over (h/g, w/g) blocks of a (n, h, w) array -> (n, g, g)."""
    n, h, w = a.shape
    bh, bw = h // g, w // g
    cols = np.add.reduceat(a, np.arange(0, w, bw), axis=2)  # (n, h, g)
    return np.add.reduceat(cols, np.arange(0, h, bh), axis=1) / (bh * bw)


def _coverage(bbox: tuple[float, float, float, float], g: int) -> np.ndarray:
    """Fraction of each of g x g cells inside ``bbox`` = (x0, y0, x1, y1) in image fractions."""
    edges = np.arange(g + 1, dtype=np.float32) / g
    lo, hi = edges[:-1], edges[1:]
    x0, y0, x1, y1 = bbox
    fx = np.clip(np.minimum(hi, x1) - np.maximum(lo, x0), 0, None) * g
    fy = np.clip(np.minimum(hi, y1) - np.maximum(lo, y0), 0, None) * g
    return np.outer(fy, fx)


_COVERAGE_CHANNEL = {cat: CHANNELS.index(cat) for cat in ("face", "body", "place", "word", "object")}


def scene_features(scenes: Sequence[Scene], batch: int = 1024) -> np.ndarray:
    """Observer input channels for each scene.

    Parameters
    ----------
    scenes : sequence of Scene
        Images (64, 64, 3) uint8 with their scene graphs.
    batch : int
        Scenes filtered at once (memory only).

    Returns
    -------
    np.ndarray, float32, shape (n_scenes, len(CHANNELS), GRID, GRID)
        Row ``i`` of the grid is the image's ``i``-th sixteenth from the top. Contrast channels are RMS band
        energies of grey levels in [0, 1]; saturation in [0, 1]; the opponent channels are cell means of
        ``grey - 0.5``, ``R - G`` and ``B - (R + G) / 2`` (RGB in [0, 1]; signed); category channels are
        coverage fractions.
    """
    n = len(scenes)
    out = np.zeros((n, len(CHANNELS), GRID, GRID), np.float32)
    for s0 in range(0, n, batch):
        chunk = scenes[s0:s0 + batch]
        imgs = stack_images(chunk).astype(np.float32) / 255.0
        if imgs.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"scene images must be ({IMAGE_SIZE}, {IMAGE_SIZE}, 3); {imgs.shape[1:]} was found")
        grey = imgs @ np.array([0.299, 0.587, 0.114], np.float32)
        blur = {s: ndimage.gaussian_filter(grey, (0, s, s), mode="reflect") for s in (0.8, 1.0, 2.5, 6.0)}
        bands = (grey - blur[0.8], blur[1.0] - blur[2.5], blur[2.5] - blur[6.0])
        sl = slice(s0, s0 + len(chunk))
        for c, b in enumerate(bands):
            out[sl, c] = np.sqrt(_block_mean(b * b, GRID))
        r, g, b = imgs[..., 0], imgs[..., 1], imgs[..., 2]
        out[sl, 3] = _block_mean(np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b), GRID)
        out[sl, 4] = _block_mean(grey - 0.5, GRID)
        out[sl, 5] = _block_mean(r - g, GRID)
        out[sl, 6] = _block_mean(b - 0.5 * (r + g), GRID)
        for k, sc in enumerate(chunk):
            for o in sc.objects:
                c = _COVERAGE_CHANNEL.get(o.category)
                if c is not None:
                    out[s0 + k, c] += _coverage(o.bbox, GRID)
    np.minimum(out[:, N_PIXEL_CHANNELS:], 1.0, out=out[:, N_PIXEL_CHANNELS:])
    return out


@functools.lru_cache(maxsize=1)
def reference_features() -> np.ndarray:
    """:func:`scene_features` of a fixed set of 120 scenes (float32 (120, len(CHANNELS), GRID, GRID)): the
    reference for channel scales and the observers' response standardisation. Computed once per process."""
    return scene_features(generate_scenes(_N_REFERENCE, seed=_REFERENCE_SEED))


@functools.lru_cache(maxsize=1)
def channel_scale() -> np.ndarray:
    """float32 (len(CHANNELS),): per-channel scale making every channel's mean magnitude over the reference
    scenes 1 (the signed opponent channels' mean is near 0)."""
    ref = reference_features()
    return (1.0 / np.abs(ref).mean(axis=(0, 2, 3))).astype(np.float32)
