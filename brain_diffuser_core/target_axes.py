"""Principal axes of a decoder's training targets: how far training features spread along any direction.

The ROI-optimal features (:func:`~brain_diffuser_core.pipeline.pattern_driven_features`) move the features from
their training mean along the direction ``u`` that a synthetic pattern drives. How far is "as far as real
images go" depends on the direction: the training features' standard deviation along ``u`` is
``sqrt(u^T Sigma u)`` with ``Sigma`` the targets' covariance, far from what the per-feature variances give
(measured on the demo: 10x off) because features are strongly correlated. ``Sigma`` itself is too big to keep
(91,168^2 for the VDVAE), but the training targets are low-rank in practice: their top 64 principal axes plus
an isotropic rest reproduce the standard deviation along every ROI direction of the demo to 4 digits (subject
1, CLIP-text, CLIP-vision and VDVAE, against the exact projection of all 3,600 training targets).

:func:`principal_axes` finds those axes by a randomized SVD with subspace iterations (Halko, Martinsson & Tropp
2011, algorithms 4.4 and 5.1) that reads the targets in column batches, the way the ridge fit streams them, so
a full NSD subject never holds its targets in memory; :func:`sd_along` evaluates the spread along a direction.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["N_AXES", "principal_axes", "sd_along"]

#: principal axes kept per decoder (64 x 197,376 float16 = 25 MB for a real CLIP-vision decoder)
N_AXES = 64


def principal_axes(get_columns: Callable[[int, int], np.ndarray], n_rows: int, n_targets: int, mean: np.ndarray, *,
                   n_components: int = N_AXES, oversample: int = 16, power_iterations: int = 2,
                   n_targets_batch: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top principal axes of the centred targets ``Y - mean`` (n_rows, n_targets), read in column batches.

    Parameters
    ----------
    get_columns : ``get_columns(start, stop)`` -> float array (n_rows, stop - start), targets' columns.
    mean : (n_targets,) column means (the decoder's ``y_mean``).
    n_components : axes returned (fewer when the targets have fewer rows or columns).
    oversample, power_iterations : randomized-SVD accuracy settings; the targets are read
        ``power_iterations + 2`` times.
    seed : the random test matrix's seed (its columns are drawn per target batch: the same batches give the
        same axes).

    Returns
    -------
    axes : float32 (n_targets, k), orthonormal columns, in decreasing order of variance.
    variances : float64 (k,), the targets' variance along each axis (ddof 0, as the decoder's ``y_std``).
    """
    n, T = int(n_rows), int(n_targets)
    mean = np.asarray(mean, np.float32).reshape(-1)
    if mean.shape != (T,):
        raise ValueError(f"'mean' must have shape ({T},); {mean.shape} was provided")
    width = min(int(n_components) + int(oversample), n, T)
    k = min(int(n_components), width)
    if k < 1:
        raise ValueError(f"'n_components' must be >= 1 and the targets non-empty; {n_components}, ({n}, {T}) given")
    step = max(1, int(n_targets_batch))

    def batches():
        for start in range(0, T, step):
            stop = min(start + step, T)
            block = np.asarray(get_columns(start, stop), np.float32)
            if block.shape != (n, stop - start):
                raise ValueError(f"target columns {start}:{stop} must have shape {(n, stop - start)}; "
                                 f"{block.shape} was returned")
            yield start, stop, block - mean[start:stop]

    # 1. range of the centred targets: Z = Yc @ Omega (n, width)
    Z = np.zeros((n, width), np.float32)
    for start, stop, yb in batches():
        omega = np.random.default_rng([int(seed), start]).standard_normal((stop - start, width), np.float32)
        Z += yb @ omega
    Q = np.linalg.qr(Z)[0]
    # 2. subspace iterations sharpen it towards the top singular directions: Q <- orth(Yc Yc^T Q)
    for _ in range(int(power_iterations)):
        Z[:] = 0.0
        for _s, _e, yb in batches():
            Z += yb @ (yb.T @ Q)
        Q = np.linalg.qr(Z)[0]
    # 3. Yc ~ Q (Q^T Yc): the SVD of the small factor gives the axes in target space
    Bt = np.empty((T, width), np.float32)
    for start, stop, yb in batches():
        Bt[start:stop] = yb.T @ Q
    U, S, _ = np.linalg.svd(Bt, full_matrices=False)
    return np.ascontiguousarray(U[:, :k], np.float32), S[:k].astype(np.float64) ** 2 / n


def sd_along(axes: np.ndarray, variances: np.ndarray, residual_variance: float, direction: np.ndarray) -> float:
    """Standard deviation of the training targets along ``direction`` (n_targets,; normalised here).

    ``sqrt(sum_k var_k c_k^2 + residual_variance * (1 - sum_k c_k^2))`` with ``c = axes^T u``: the principal
    axes' variances where ``u`` lies in their span, the mean variance left per other dimension elsewhere.
    """
    u = np.asarray(direction, np.float64).reshape(-1)
    norm = np.linalg.norm(u)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("'direction' must be a finite, non-zero vector")
    c = np.asarray(axes, np.float64).T @ (u / norm)
    inside = float(min(1.0, (c ** 2).sum()))
    var = float(np.asarray(variances, np.float64) @ c ** 2) + max(float(residual_variance), 0.0) * (1.0 - inside)
    return float(np.sqrt(max(var, 0.0)))
