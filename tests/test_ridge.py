import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import Ridge

from brain_diffuser_core.ridge import RidgeDecoder, choose_alpha, factorise, fit_ridge

BACKENDS = ["numpy", "torch"] + (["torch_cuda"] if torch.cuda.is_available() else [])


def _data(rng, n=40, p=60, t=7, noise=0.5):
    X = rng.standard_normal((n, p)) @ np.diag(np.linspace(2.0, 0.2, p)) + 3.0
    W = rng.standard_normal((p, t)) * 0.3
    Y = X @ W + noise * rng.standard_normal((n, t)) + rng.standard_normal(t) * 5
    return X.astype(np.float32), Y.astype(np.float32)


def _closed_form(X, Y, alpha):
    """Float64 primal solution with an unpenalised intercept."""
    X = X.astype(np.float64)
    Y = Y.astype(np.float64)
    xm, ym = X.mean(0), Y.mean(0)
    Xc = X - xm
    W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ (Y - ym))
    return W, ym - xm @ W


def _brute_loo(X, Y, alpha):
    """Leave-one-out predictions by refitting n times (float64)."""
    n = X.shape[0]
    out = np.empty(Y.shape)
    for i in range(n):
        keep = np.arange(n) != i
        W, b = _closed_form(X[keep], Y[keep], alpha)
        out[i] = X[i].astype(np.float64) @ W + b
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_closed_form_float64(rng, backend):
    X, Y = _data(rng)
    Xt = rng.standard_normal((9, X.shape[1])).astype(np.float32) + 3.0
    W, b = _closed_form(X, Y, 5.0)
    dec = fit_ridge(X, Y, 5.0, backend=backend, dtype="float32")
    np.testing.assert_allclose(dec.dense_weight().numpy(), W, rtol=2e-3, atol=2e-4 * np.abs(W).max())
    np.testing.assert_allclose(dec.predict(Xt, rescale="none"), Xt @ W + b, rtol=1e-3, atol=1e-3)


def test_matches_sklearn_ridge_more_samples_than_features(rng):
    X, Y = _data(rng, n=80, p=15, t=4)
    Xt = rng.standard_normal((6, 15)).astype(np.float32)
    ref = Ridge(alpha=3.0, fit_intercept=True).fit(X.astype(np.float64), Y.astype(np.float64))
    dec = fit_ridge(X, Y, 3.0, backend="torch", dtype="float32")
    np.testing.assert_allclose(dec.predict(Xt, rescale="none"), ref.predict(Xt), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_float16_storage_keeps_small_weights(rng, form):
    X, Y = _data(rng)
    Y = Y * 1e-5  # weights ~1e-6: would underflow float16 without the per-column scale
    Xt = rng.standard_normal((5, X.shape[1])).astype(np.float32) + 3.0
    W, b = _closed_form(X, Y, 5.0)
    dec = fit_ridge(X, Y, 5.0, backend="torch", form=form)
    assert dec.form == form and dec.weight_dtype == "float16"
    assert dec.tensors["weight" if form == "primal" else "dual_coef"].dtype == torch.float16
    ref = Xt @ W + b
    got = dec.predict(Xt, rescale="none")
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref - b).max()


def test_batching_and_target_sources_are_equivalent(rng, tmp_path):
    X, Y = _data(rng, t=11)
    fact = factorise(X, backend="torch")
    ref = fit_ridge(fact, Y, 7.0, n_targets_batch=1000, dtype="float32")
    mm = np.lib.format.open_memmap(tmp_path / "y.npy", mode="w+", dtype=np.float32, shape=Y.shape)
    mm[:] = Y
    mm.flush()
    calls = []
    variants = [
        fit_ridge(fact, Y, 7.0, n_targets_batch=3, dtype="float32"),
        fit_ridge(fact, np.load(tmp_path / "y.npy", mmap_mode="r"), 7.0, n_targets_batch=4, dtype="float32"),
        fit_ridge(fact, lambda a, b: (calls.append((a, b)), Y[:, a:b])[1], 7.0, n_targets=11,
                  n_targets_batch=5, dtype="float32"),
    ]
    assert calls == [(0, 5), (5, 10), (10, 11)]
    assert ref.form == "dual"  # n 40 < p 60
    for dec in variants:
        for k in ("y_mean", "y_std", "loo_mean", "loo_std"):
            torch.testing.assert_close(dec.tensors[k], ref.tensors[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dec.dense_weight(), ref.dense_weight(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_loo_statistics_match_refitting(rng, backend):
    X, Y = _data(rng, n=30, p=45, t=5)
    loo = _brute_loo(X, Y, 20.0)
    dec = fit_ridge(X, Y, 20.0, backend=backend)
    np.testing.assert_allclose(dec.tensors["loo_mean"].numpy(), loo.mean(0), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(dec.tensors["loo_std"].numpy(), loo.std(0), rtol=1e-3)
    np.testing.assert_allclose(dec.tensors["y_std"].numpy(), Y.astype(np.float64).std(0), rtol=1e-5)


def test_rescale_modes(rng):
    X, Y = _data(rng, n=30, p=45, t=5)
    Xt = rng.standard_normal((8, 45)).astype(np.float32) + 3.0
    W, b = _closed_form(X, Y, 20.0)
    raw = Xt @ W + b
    loo = _brute_loo(X, Y, 20.0)
    y64 = Y.astype(np.float64)
    dec = fit_ridge(X, Y, 20.0, backend="torch", dtype="float32")
    train = (raw - loo.mean(0)) / loo.std(0) * y64.std(0) + y64.mean(0)
    paper = (raw - raw.mean(0)) / raw.std(0) * y64.std(0) + y64.mean(0)
    np.testing.assert_allclose(dec.predict(Xt, rescale="none"), raw, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(dec.predict(Xt, rescale="train"), train, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(dec.predict(Xt, rescale="paper"), paper, rtol=2e-3, atol=2e-3)
    # "train" works on a single trial and does not depend on the other rows of the batch
    np.testing.assert_allclose(dec.predict(Xt[:1], rescale="train")[0], dec.predict(Xt, rescale="train")[0], rtol=1e-5)
    with pytest.raises(ValueError, match="needs >= 2 rows"):
        dec.predict(Xt[:1], rescale="paper")
    with pytest.raises(ValueError, match="'rescale' must be one of"):
        dec.predict(Xt, rescale="zscore")
    no_loo = fit_ridge(X, Y, 20.0, backend="torch", loo_stats=False)
    with pytest.raises(ValueError, match="loo_stats=False"):
        no_loo.predict(Xt, rescale="train")


def test_loo_stats_on_a_row_subset_is_close(rng):
    X, Y = _data(rng, n=200, p=80, t=6)
    full = fit_ridge(X, Y, 30.0, backend="torch")
    sub = fit_ridge(X, Y, 30.0, backend="torch", loo_stats=120)
    np.testing.assert_allclose(sub.tensors["loo_std"].numpy(), full.tensors["loo_std"].numpy(), rtol=0.2)
    assert not np.allclose(sub.tensors["loo_std"].numpy(), full.tensors["loo_std"].numpy(), rtol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_low_rank_is_the_best_rank_r_weight(rng, backend):
    X, Y = _data(rng, n=40, p=60, t=12)
    W, b = _closed_form(X, Y, 5.0)
    u, s, vt = np.linalg.svd(W, full_matrices=False)
    for r in (3, 7):
        best = (u[:, :r] * s[:r]) @ vt[:r]
        dec = fit_ridge(X, Y, 5.0, backend=backend, rank=r, lowrank="weights", dtype="float32")
        assert dec.rank == r and dec.tensors["factor_a"].shape == (60, r)
        np.testing.assert_allclose(dec.dense_weight().numpy(), best, atol=2e-3 * np.abs(W).max())
    full_rank = fit_ridge(X, Y, 5.0, backend=backend, rank=12, lowrank="weights", dtype="float32")
    np.testing.assert_allclose(full_rank.dense_weight().numpy(), W, atol=2e-3 * np.abs(W).max())


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_low_rank_predictions_is_the_best_rank_r_train_prediction(rng, backend):
    X, Y = _data(rng, n=40, p=60, t=12)
    W, b = _closed_form(X, Y, 5.0)
    Xc = X - X.mean(0)
    fitted = Xc @ W  # centred train predictions
    u, s, vt = np.linalg.svd(fitted, full_matrices=False)
    for r in (3, 7):
        best = (u[:, :r] * s[:r]) @ vt[:r]
        dec = fit_ridge(X, Y, 5.0, backend=backend, rank=r, lowrank="predictions", dtype="float32")
        np.testing.assert_allclose(Xc @ dec.dense_weight().numpy(), best, atol=2e-3 * np.abs(fitted).max())
        # it beats the weight-optimal factors on the train predictions, the decoder's job
        by_weight = fit_ridge(X, Y, 5.0, backend=backend, rank=r, lowrank="weights", dtype="float32")
        err = lambda d: np.linalg.norm(Xc @ d.dense_weight().numpy() - fitted)
        assert err(dec) < err(by_weight)
    full_rank = fit_ridge(X, Y, 5.0, backend=backend, rank=12, lowrank="predictions", dtype="float32")
    np.testing.assert_allclose(Xc @ full_rank.dense_weight().numpy(), fitted, atol=2e-3 * np.abs(fitted).max())
    with pytest.raises(ValueError, match="'lowrank' must be one of"):
        fit_ridge(X, Y, 5.0, rank=3, lowrank="best")


def test_low_rank_float16_predictions_and_progress(rng):
    X, Y = _data(rng, n=40, p=60, t=12)
    Xt = rng.standard_normal((10, 60)).astype(np.float32) + 3.0
    W, b = _closed_form(X, Y, 5.0)
    seen = []
    dec = fit_ridge(X, Y, 5.0, backend="torch", rank=12, n_targets_batch=5, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(5, 24), (10, 24), (12, 24), (17, 24), (22, 24), (24, 24)]
    ref = Xt @ W + b
    got = dec.predict(Xt, rescale="none", n_targets_batch=4)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9999


def test_state_dict_round_trip_through_safetensors(rng, tmp_path):
    X, Y = _data(rng)
    Xt = rng.standard_normal((4, X.shape[1])).astype(np.float32)
    for kw in ({"form": "primal"}, {"form": "dual"}, {"rank": 5}):
        dec = fit_ridge(X, Y, 5.0, backend="torch", **kw)
        save_file(dec.state_dict(), str(tmp_path / "d.safetensors"))
        back = RidgeDecoder.from_state_dict(load_file(str(tmp_path / "d.safetensors")))
        assert back.alpha == 5.0 and back.n_train == 40 and back.rank == dec.rank
        np.testing.assert_array_equal(back.predict(Xt), dec.predict(Xt))
    state = dec.state_dict()
    state["y_std"] = state["y_std"][:3]
    with pytest.raises(ValueError, match="'y_std' must have shape"):
        RidgeDecoder.from_state_dict(state)


def test_choose_alpha_matches_refitting(rng):
    X, Y = _data(rng, n=30, p=45, t=4, noise=2.0)
    alphas = [0.1, 10.0, 100.0, 1e4]
    best, scores = choose_alpha(X, Y, alphas, backend="torch", n_targets_batch=3)
    y64 = Y.astype(np.float64)
    sst = ((y64 - y64.mean(0)) ** 2).sum(0)
    for a in alphas:
        loo = _brute_loo(X, Y, a)
        expect = np.mean(1 - ((y64 - loo) ** 2).sum(0) / sst)
        assert scores[a] == pytest.approx(expect, abs=2e-3)
    assert best == max(scores, key=scores.get)
    assert best not in (alphas[0], alphas[-1])


def test_input_errors(rng):
    X, Y = _data(rng)
    with pytest.raises(ValueError, match="'Y' must have 40 rows"):
        fit_ridge(X, Y[:30], 1.0, backend="torch")
    with pytest.raises(ValueError, match="'backend' must be one of"):
        fit_ridge(X, Y, 1.0, backend="jax")
    with pytest.raises(ValueError, match="'alpha' must be a positive"):
        fit_ridge(X, Y, -1.0, backend="torch")
    with pytest.raises(ValueError, match="'n_targets' is required"):
        fit_ridge(X, lambda a, b: Y[:, a:b], 1.0, backend="torch")
    with pytest.raises(ValueError, match="'rank' must be between 1 and n_samples=40"):
        fit_ridge(X, Y, 1.0, backend="torch", rank=41)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="'X' contains NaN"):
        fit_ridge(bad, Y, 1.0, backend="torch")
    dec = fit_ridge(X, Y, 1.0, backend="torch")
    with pytest.raises(ValueError, match=r"'X' must have shape \(n_samples, 60\)"):
        dec.predict(X[:, :10])


@pytest.mark.parametrize("as_tensor", [False, True])
def test_non_finite_targets_are_named_and_huge_finite_ones_are_not(rng, as_tensor):
    """The target check sums each batch first; a NaN or inf anywhere is refused with the batch named, while
    finite values whose sum overflows float32 pass the check (the full elementwise test decides)."""
    from brain_diffuser_core.ridge_backends import _Targets

    X, Y = _data(rng)
    for bad_value in (np.nan, np.inf, -np.inf):
        bad = Y.copy()
        bad[3, 6] = bad_value
        src = torch.from_numpy(bad) if as_tensor else bad
        with pytest.raises(ValueError, match=r"'Y' batch \[5:7\] contains NaN or infinite values"):
            fit_ridge(X, src, 1.0, backend="torch", n_targets_batch=5)
    huge = np.full((40, 4), 3e38, dtype=np.float32)  # the column sums overflow; every value is finite
    block = _Targets(torch.from_numpy(huge) if as_tensor else huge, 40, None).get(0, 4)
    assert block.shape == (40, 4)


def test_predict_is_plain_ridge_unless_asked(rng):
    X, Y = _data(rng, n=30, p=45, t=5)
    Xt = rng.standard_normal((8, 45)).astype(np.float32) + 3.0
    W, b = _closed_form(X, Y, 20.0)
    dec = fit_ridge(X, Y, 20.0, backend="torch", dtype="float32")
    np.testing.assert_allclose(dec.predict(Xt), Xt @ W + b, rtol=1e-3, atol=1e-3)
    assert not np.allclose(dec.predict(Xt), dec.predict(Xt, rescale="train"), atol=1e-2)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_kernel_factorisation_gives_the_eigh_fit(rng, backend):
    """The fixed-alpha path (Cholesky inverse, no eigendecomposition) against the all-alphas one and refitting."""
    X, Y = _data(rng, n=50, p=70, t=6)
    Xt = rng.standard_normal((5, 70)).astype(np.float32) + 3.0
    kern = factorise(X, backend=backend, method="kernel")
    eig = factorise(X, backend=backend, method="eigh")
    assert (kern.method, eig.method) == ("kernel", "eigh") and kern.n_features == 70 and kern.n_samples == 50
    a = fit_ridge(kern, Y, 8.0, dtype="float32")
    b = fit_ridge(eig, Y, 8.0, dtype="float32")
    W, c = _closed_form(X, Y, 8.0)
    np.testing.assert_allclose(a.predict(Xt), Xt @ W + c, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(a.predict(Xt), b.predict(Xt), rtol=1e-4, atol=1e-4)
    loo = _brute_loo(X, Y, 8.0)
    np.testing.assert_allclose(a.tensors["loo_mean"].numpy(), loo.mean(0), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(a.tensors["loo_std"].numpy(), loo.std(0), rtol=1e-3, atol=1e-3)
    sub = fit_ridge(kern, Y, 8.0, loo_stats=20)  # LOO statistics from a sample of rows, the same rows either way
    np.testing.assert_allclose(sub.tensors["loo_std"].numpy(), fit_ridge(eig, Y, 8.0, loo_stats=20).tensors["loo_std"],
                               rtol=1e-3)
    with pytest.raises(ValueError, match="needs the eigendecomposition: factorise\\(X, method='eigh'\\)"):
        fit_ridge(kern, Y, 8.0, rank=3)
    with pytest.raises(ValueError, match="choose_alpha .* needs the eigendecomposition"):
        choose_alpha(kern, Y, [1.0, 10.0])
    with pytest.raises(ValueError, match="'method' must be one of"):
        factorise(X, method="svd")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("method", ["kernel", "eigh"])
@pytest.mark.parametrize("dual_form", ["whitened", "targets"])
def test_dual_form_is_the_ridge_solution(rng, backend, method, dual_form):
    """Both dual factorings (W = G^T C; whitened below the kernel's mean eigenvalue, the centred targets
    themselves as C at or above it) against the float64 closed form, refitting for the leave-one-out
    statistics, and the primal form; "auto" picks dual exactly when n < p."""
    X, Y = _data(rng, n=30, p=45, t=6)
    Xt = rng.standard_normal((7, 45)).astype(np.float32) + 3.0
    fact = factorise(X, backend=backend, method=method)
    alpha = 6.0 if dual_form == "whitened" else 2.5 * fact.mean_eigenvalue()
    assert fact.dual_form(alpha) == dual_form and fact.dual_form(0.99 * fact.mean_eigenvalue()) == "whitened"
    dual = fit_ridge(fact, Y, alpha, form="dual", dtype="float32")
    primal = fit_ridge(fact, Y, alpha, form="primal", dtype="float32")
    assert (dual.form, primal.form, fit_ridge(fact, Y, alpha).form) == ("dual", "primal", "dual")
    assert dual.tensors["dual_coef"].shape == (30, 6) and dual.tensors["dual_x"].shape == (30, 45)
    if dual_form == "targets":  # no solve per target: C is Yc itself (per-column scaled)
        coef = dual.tensors["dual_coef"].numpy() * dual.tensors["dual_coef_scale"].numpy()
        np.testing.assert_allclose(coef, Y - Y.mean(0), rtol=1e-5, atol=1e-5 * np.abs(Y).max())
    W, b = _closed_form(X, Y, alpha)
    np.testing.assert_allclose(dual.dense_weight().numpy(), W, rtol=2e-3, atol=2e-4 * np.abs(W).max())
    np.testing.assert_allclose(dual.predict(Xt), Xt @ W + b, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(dual.predict(Xt), primal.predict(Xt), rtol=1e-4, atol=1e-4)
    loo = _brute_loo(X, Y, alpha)
    np.testing.assert_allclose(dual.tensors["loo_mean"].numpy(), loo.mean(0), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(dual.tensors["loo_std"].numpy(), loo.std(0), rtol=1e-3)
    sub_d, sub_p = (fit_ridge(fact, Y, alpha, form=f, loo_stats=12) for f in ("dual", "primal"))
    np.testing.assert_allclose(sub_d.tensors["loo_std"].numpy(), sub_p.tensors["loo_std"].numpy(), rtol=1e-4)
    X2, Y2 = _data(rng, n=60, p=20, t=3)
    assert fit_ridge(X2, Y2, 6.0, backend=backend).form == "primal"  # n > p: the primal weights are smaller
    with pytest.raises(ValueError, match="'form' must be one of"):
        fit_ridge(fact, Y, 6.0, form="kernel")


def test_dual_float16_is_as_accurate_as_primal_at_small_alpha(rng):
    """Plain dual coefficients (K + alpha I)^-1 Yc lose float16 precision to cancellation at small alpha; the
    whitened factors keep the error at float16 rounding, within a few times the primal weights'."""
    n, p, t = 300, 500, 40
    Z = rng.standard_normal((n + 50, 30))
    X = ((Z * np.arange(1, 31) ** -0.5) @ rng.standard_normal((30, p)) + rng.standard_normal((n + 50, p)))
    Y = Z[:, :10] @ rng.standard_normal((10, t)) + 0.5 * rng.standard_normal((n + 50, t))
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    fact = factorise(X[:n], backend="torch", method="kernel")
    alpha = 1.0  # far below the kernel's noise eigenvalues (~p)
    exact = fit_ridge(fact, Y[:n], alpha, form="primal", dtype="float32").predict(X[n:])
    err = {f: np.abs(fit_ridge(fact, Y[:n], alpha, form=f).predict(X[n:]) - exact).max() / exact.std()
           for f in ("primal", "dual")}
    # the unwhitened dual coefficients, rounded to float16 per column, for contrast
    D = np.linalg.inv(fact.K.numpy().astype(np.float64) + alpha * np.eye(n))
    A = D @ (Y[:n] - Y[:n].mean(0))
    A16 = (A / np.abs(A).max(0)).astype(np.float16).astype(np.float64) * np.abs(A).max(0)
    plain = (X[n:] - X[:n].mean(0)) @ fact.Xc.numpy().T.astype(np.float64) @ A16 + Y[:n].mean(0)
    err_plain = np.abs(plain - exact).max() / exact.std()
    assert err["dual"] < 5e-3 and err["dual"] < 6 * err["primal"]
    assert err_plain > 3 * err["dual"]


@pytest.mark.parametrize("relative_alpha", [1.0, 4.0])
def test_dual_targets_form_keeps_float16_precision_at_large_alpha(rng, relative_alpha):
    """At alpha >= the kernel's mean eigenvalue the dual form stores the centred targets (no solve per target);
    its float16 predictions must stay as close to the exact solution as the whitened factors' at the same alpha
    (computed here independently in float64 and rounded per column like the stored factors) and within a few
    times the primal weights'."""
    n, p, t = 300, 500, 40
    Z = rng.standard_normal((n + 50, 30))
    X = ((Z * np.arange(1, 31) ** -0.5) @ rng.standard_normal((30, p)) + rng.standard_normal((n + 50, p)))
    Y = Z[:, :10] @ rng.standard_normal((10, t)) + 0.5 * rng.standard_normal((n + 50, t)) + 3.0
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    fact = factorise(X[:n], backend="torch", method="kernel")
    alpha = relative_alpha * fact.mean_eigenvalue()
    assert fact.dual_form(alpha) == "targets"
    exact = fit_ridge(fact, Y[:n], alpha, form="primal", dtype="float32").predict(X[n:])
    err = {f: np.abs(fit_ridge(fact, Y[:n], alpha, form=f).predict(X[n:]) - exact).max() / exact.std()
           for f in ("primal", "dual")}

    def q16(a):  # per-column max scaling and float16 rounding, as the stored factors
        s = np.abs(a).max(0)
        return (a / s).astype(np.float16).astype(np.float64) * s

    Xc = fact.Xc.numpy().astype(np.float64)
    L = np.linalg.cholesky(Xc @ Xc.T + alpha * np.eye(n))
    G, C = np.linalg.solve(L, Xc), np.linalg.solve(L, Y[:n] - Y[:n].mean(0))
    whitened = (X[n:] - X[:n].mean(0)) @ q16(G.T) @ q16(C) + Y[:n].mean(0)
    err_whitened = np.abs(whitened - exact).max() / exact.std()
    assert err["dual"] < 1.5 * err_whitened and err["dual"] < 4 * err["primal"]
