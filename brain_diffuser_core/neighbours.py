"""Nearest neighbours of decoded CLIP features among a bank of true features (captions or images).

Used by the Walkthrough page to show what the predicted CLIP-text / CLIP-vision embeddings are closest to: the
test set's captions and images, embedded by the bundle's own CLIP towers. Similarity is the cosine of the
flattened (tokens x dimensions) features, by default after subtracting the bank's mean feature: decoded and true
CLIP tokens share a large common component (the class/start token, the padding tokens), which otherwise
dominates every cosine and flattens the ranking.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _check(query, bank) -> tuple[np.ndarray, np.ndarray]:
    """(query (F,), bank (N, F)) float64 flattened, after checking the shapes agree."""
    bank = np.asarray(bank)
    if bank.ndim != 3 or bank.shape[0] < 1:
        raise ValueError(f"'bank' must have shape (N >= 1, T, D); found shape {bank.shape}")
    n, t, d = bank.shape
    query = np.asarray(query)
    if query.shape not in ((t, d), (t * d,)):
        raise ValueError(f"'query' must have shape ({t}, {d}) or ({t * d},) to match the bank's (N, T, D) = "
                         f"{bank.shape}; found shape {query.shape}")
    q = query.reshape(-1).astype(np.float64)
    b = bank.reshape(n, -1).astype(np.float64)
    if not (np.isfinite(q).all() and np.isfinite(b).all()):
        raise ValueError("'query' and 'bank' must be finite; NaN/inf values were found")
    return q, b


def cosines(query, bank, centre: bool = True) -> np.ndarray:
    """Cosine similarity of ``query`` to every bank entry: float32 (N,), in [-1, 1].

    query : (T, D) or (T*D,) features; bank : (N, T, D). ``centre`` subtracts the bank's mean (over N) from
    both before comparing. A zero vector (after centring) has cosine 0 with everything.
    """
    q, b = _check(query, bank)
    if centre:
        mean = b.mean(axis=0)
        q, b = q - mean, b - mean
    qn = np.linalg.norm(q)
    bn = np.linalg.norm(b, axis=1)
    denom = qn * bn
    out = np.divide(b @ q, denom, out=np.zeros(len(b)), where=denom > 0)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def nearest(query, bank, k: int = 5, centre: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` bank entries most similar to ``query``, best first.

    Parameters
    ----------
    query : array (T, D) or (T*D,)
    bank : array (N, T, D)
    k : int >= 1; clipped to N.
    centre : subtract the bank's mean before the cosine (see the module docstring).

    Returns
    -------
    indices : int64 (min(k, N),) into the bank; cosine : float32 (min(k, N),). Ties keep bank order.
    """
    if int(k) < 1:
        raise ValueError(f"'k' must be >= 1; {k} was provided")
    cos = cosines(query, bank, centre=centre)
    order = np.argsort(-cos, kind="stable")[: int(k)]
    return order.astype(np.int64), cos[order]


def rank_of(query, bank, true_index: int, centre: bool = True) -> int:
    """Rank (1 = nearest) of bank entry ``true_index`` by cosine to ``query``; ties count in its favour."""
    cos = cosines(query, bank, centre=centre)
    i = int(true_index)
    if not 0 <= i < len(cos):
        raise ValueError(f"'true_index' must be in [0, {len(cos)}); {true_index} was provided")
    return int(np.sum(cos > cos[i])) + 1


def caption_bank(extractor, captions: Sequence[Sequence[str]]) -> np.ndarray:
    """CLIP-text features of each image's captions (averaged per image): float32 (N, 77, D).

    extractor : :class:`~brain_diffuser_core.features.clip.ClipFeatureExtractor`; captions : one list of
    captions per image (each non-empty).
    """
    return np.asarray(extractor.text_embeddings_batch([list(c) for c in captions]), dtype=np.float32)


def image_bank(extractor, images) -> np.ndarray:
    """CLIP-vision features of uint8 RGB images (N, H, W, 3): float32 (N, 257, D)."""
    return np.asarray(extractor.vision_embeddings(np.asarray(images)), dtype=np.float32)
