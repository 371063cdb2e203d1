"""Principal axes of decoder targets (target_axes.py) against numpy's exact SVD, and their use by decoders."""
import numpy as np
import pytest

from brain_diffuser_core.ridge import fit_ridge
from brain_diffuser_core.target_axes import principal_axes, sd_along


def _targets(rng, n=300, T=700, decay=0.93):
    """n x T targets with a decaying spectrum (as features: a few strong directions, a long weak tail)."""
    u = np.linalg.qr(rng.standard_normal((n, n)))[0]
    v = np.linalg.qr(rng.standard_normal((T, n)))[0]
    s = 30.0 * decay ** np.arange(n) + 0.3
    return (u * s) @ v.T + 5.0  # a non-zero mean, which the axes must not see


def test_axes_match_the_exact_svd_read_in_column_batches(rng):
    y = _targets(rng).astype(np.float32)
    mean = y.mean(0)
    reads = []

    def get(a, b):
        reads.append((a, b))
        return y[:, a:b]

    axes, var = principal_axes(get, y.shape[0], y.shape[1], mean, n_components=16, n_targets_batch=128, seed=3)
    assert axes.shape == (700, 16) and axes.dtype == np.float32 and var.shape == (16,)
    assert max(b - a for a, b in reads) <= 128 and len(reads) == 4 * 6  # power_iterations + 2 passes of 6 batches
    np.testing.assert_allclose(axes.T @ axes, np.eye(16), atol=1e-5)
    yc = (y - mean).astype(np.float64)
    _, s, vt = np.linalg.svd(yc, full_matrices=False)
    np.testing.assert_allclose(var, s[:16] ** 2 / len(y), rtol=1e-3)
    overlap = np.abs(np.sum(axes * vt[:16].T, axis=0))  # |cos| between each axis and the exact one
    assert overlap.min() > 0.999
    # the same batches and seed give the same axes; another seed the same subspace
    again, _ = principal_axes(lambda a, b: y[:, a:b], 300, 700, mean, n_components=16, n_targets_batch=128, seed=3)
    np.testing.assert_array_equal(again, axes)
    with pytest.raises(ValueError, match="'mean' must have shape"):
        principal_axes(get, 300, 700, mean[:5])
    with pytest.raises(ValueError, match="must have shape"):
        principal_axes(lambda a, b: y[:10, a:b], 300, 700, mean)


def test_sd_along_a_direction_matches_the_projected_targets(rng):
    y = _targets(rng)
    mean = y.mean(0)
    yc = y - mean
    axes, var = principal_axes(lambda a, b: y[:, a:b], *y.shape, mean, n_components=64)
    residual = ((yc ** 2).mean(0).sum() - var.sum()) / (y.shape[1] - 64)
    for direction in (yc.T @ rng.standard_normal(len(y)),    # in the row space: where ROI directions lie
                      yc[:3].sum(0),                          # a few training images
                      rng.standard_normal(y.shape[1])):       # anywhere: the isotropic rest matters
        u = direction / np.linalg.norm(direction)
        exact = float((yc @ u).std())
        assert sd_along(axes, var, residual, direction) == pytest.approx(exact, rel=0.05)
    # per-feature variances alone are far off along a correlated direction: why the axes are kept
    u = axes[:, 0].astype(np.float64)
    assert np.sqrt(((yc ** 2).mean(0) * u ** 2).sum()) < 0.3 * sd_along(axes, var, residual, u)
    with pytest.raises(ValueError, match="non-zero"):
        sd_along(axes, var, residual, np.zeros(y.shape[1]))


def test_decoder_keeps_its_axes_through_its_state_dict(rng):
    from brain_diffuser_core.ridge_decoder import RidgeDecoder

    x = rng.standard_normal((60, 20)).astype(np.float32)
    y = (x @ rng.standard_normal((20, 90)) + rng.standard_normal((60, 90))).astype(np.float32)
    dec = fit_ridge(x, y, alpha=10.0, backend="numpy")
    assert not dec.has_target_axes
    with pytest.raises(ValueError, match="refit"):
        dec.target_sd_along(np.ones(90))
    dec.add_target_axes(*principal_axes(lambda a, b: y[:, a:b], 60, 90, dec.tensors["y_mean"].numpy(),
                                        n_components=24))  # the 20-dim signal + isotropic noise
    back = RidgeDecoder.from_state_dict(dec.state_dict())
    assert back.has_target_axes and back.tensors["target_axes"].shape == (90, 24)
    u = rng.standard_normal(90)
    assert back.target_sd_along(u) == pytest.approx(dec.target_sd_along(u), rel=1e-6)
    assert back.target_sd_along(u) == pytest.approx(float(((y - y.mean(0)) @ (u / np.linalg.norm(u))).std()),
                                                    rel=0.05)
    with pytest.raises(ValueError, match="'axes' must be"):
        dec.add_target_axes(np.zeros((89, 8)), np.ones(8))
    state = dec.state_dict()
    del state["target_axes_var"]
    with pytest.raises(ValueError, match="target_axes"):
        RidgeDecoder.from_state_dict(state)
