"""Multi-output ridge regression for very many targets: one kernel factorisation, targets in batches.

Model, per target column ``y`` (intercept ``b`` not penalised)::

    min_{w, b}  || y - X w - b ||^2 + alpha * || w ||^2

With ``Xc = X - mean(X)`` (n, p) and the eigendecomposition of the kernel ``K = Xc Xc^T = U diag(lam) U^T``
(n x n, computed once), every target and every alpha is served by the same ``U``, ``lam``::

    W = Xc^T U diag(1 / (lam + alpha)) U^T Yc          (p, n_targets)
    hat matrix  H = 1 1^T / n + U diag(lam / (lam + alpha)) U^T
    leave-one-out prediction  loo_i = y_i - r_i / (1 - H_ii),   r = y - y_hat (train residuals)

The kernel form suits fMRI decoding, where n (8,859 train images) < p (up to 15,724 voxels). The targets (up
to 197,376 columns per feature) are streamed in column batches of ``n_targets_batch``. Two forms of full
weights (``fit_ridge(form=...)``; "auto": dual when n < p):

- dual: with ``K + alpha I = L L^T`` (Cholesky, once per alpha), ``W = G^T C`` with ``G`` (n, p) and ``C``
  (n, n_targets), factored one of two ways (:meth:`RidgeFactorisation.dual_form`):

  - alpha >= the kernel's mean eigenvalue ``trace(K) / n``, about the number of voxels for z-scored voxels
    (the paper's alphas are 3x it or more on NSD): ``G = (K + alpha I)^-1 Xc`` (two triangular solves per
    alpha) and ``C = Yc``, the centred targets themselves: a target costs no solve, only centring, the float16
    store and the leave-one-out rows.
    There ``(K + alpha I)^-1`` is well conditioned, so rounding ``Yc`` to float16 costs no more than
    rounding the primal weights.
  - below it (whitened): ``G = L^-1 Xc`` and ``C = L^-1 Yc``; ``C`` costs one triangular solve, n^2 flops per
    target. Each factor carries the square root of the shrinkage, so float16 storage loses no more than the
    primal weights do (the plain dual coefficients ``(K + alpha I)^-1 Yc``, or ``Yc`` with all the shrinkage
    in ``G``, would, at small alpha, to cancellation).

  The train residuals ``alpha (K + alpha I)^-1 Yc`` at the sampled rows give the leave-one-out statistics.
- primal: the projector ``H = Xc^T (K + alpha I)^-1`` (p, n) is built once (O(p n^2)), then ``W = H Yc``,
  2 p n flops per target.

Both add 2 m n flops per target for the leave-one-out statistics on m rows (m = n by default; an int
``loo_stats`` samples m rows). Peak memory is O(n*p + n^2 + (n + p) * n_targets_batch) plus the stored
weights, never the float32 p x n_targets matrix.

Two factorisations (:func:`factorise`, ``method``):

- ``"eigh"``: the eigendecomposition ``K = U diag(lam) U^T`` serves every alpha at once (``choose_alpha``'s
  cross-validation over a grid, and the low-rank factors); O(n^3) with a large constant (a symmetric
  eigensolver, partly matrix-vector bound) plus ``Xc^T U`` (2 p n^2).
- ``"kernel"``: for alphas fixed in advance (the paper's), only ``K`` is kept; per alpha a Cholesky inverse of
  ``K + alpha I`` (n^3 / 3 + n^3, matrix-matrix bound) gives H, the hat diagonal ``1 + 1/n - alpha
  diag((K + alpha I)^-1)`` and the hat rows ``I - alpha (K + alpha I)^-1`` the leave-one-out statistics need.
  No eigendecomposition. What :func:`fit_ridge` uses for full weights when given X itself.

Storage (:class:`~brain_diffuser_core.ridge_decoder.RidgeDecoder`; array backends in
:mod:`~brain_diffuser_core.ridge_backends`): float16 (default) or float32 weights (or dual factors) with a
float32 scale per column, so small weights (CLIP features are ~1e-2) do not underflow float16; optionally low
rank ``W ~ A @ B``. The
rank-r factors are the Frobenius-optimal ones: ``W = V M`` with ``Xc = U S V^T`` and the middle factor
``M = diag(s / (lam + alpha)) U^T Yc`` (n, n_targets); ``V`` has orthonormal columns, so the best rank-r
``W`` is ``V`` times the best rank-r ``M``. ``M M^T = diag(.) U^T (Yc Yc^T) U diag(.)`` comes from the target
Gram matrix ``Yc Yc^T`` (n x n) accumulated batch-wise (2 n^2 flops per target); its top-r eigenvectors P
give ``A = Xc^T U diag(1/s) P`` (p, r), and ``B = P^T M`` (r, n_targets) is filled in a second streamed pass
(2 r n flops per target).

Why not himalaya (0.4.11, installed) directly: its ``solve_kernel_ridge_eigenvalues`` / ``solve_ridge_svd``
take Y whole in memory and return full float32/float64 dual or primal weights; they do not stream targets
from a callable or a memmap, do not give leave-one-out prediction statistics (needed for rescaling without
test-set statistics), nor low-rank or float16 storage. The algebra here is the same as its "eigenvalues"
solver; the backends follow its numpy / torch / torch_cuda switch.

Prediction rescaling (``RidgeDecoder.predict(X, rescale=...)``; plain ridge, ``"none"``, unless asked):

- ``"train"``: z-score with the per-target mean/std of the leave-one-out predictions on the TRAIN data,
  then map to the train target mean/std. Uses no test statistics; works for a single trial.
- ``"paper"``: the original scripts' rule: z-score across the predicted batch itself, then map to the train
  target mean/std (std with ddof=0, as ``np.std``). Leaks test statistics; for reproducing the table only.
- ``"none"``: raw ridge predictions.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .ridge_backends import BACKENDS, _get_ops, _Targets
from .ridge_decoder import RESCALE_MODES, RidgeDecoder
from .seeding import seed_for

__all__ = [
    "BACKENDS",
    "RESCALE_MODES",
    "RidgeFactorisation",
    "RidgeDecoder",
    "FACTORISATIONS",
    "FORMS",
    "factorise",
    "fit_ridge",
    "choose_alpha",
]

_WEIGHT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: relative threshold below which a kernel eigenvalue counts as zero (float32 arithmetic)
_EIG_RTOL = 1e-6

ProgressFn = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------- factorisation
@dataclass
class RidgeFactorisation:
    """Centred X reduced to what every target and alpha share (see :func:`factorise`).

    Attributes
    ----------
    x_mean : (p,) float32 column means of X (on the backend).
    method : "eigh" (``XtU``, ``lam``, ``U`` set) or "kernel" (``Xc``, ``K`` set).
    XtU : (p, n) float32 ``Xc^T U``; weights are ``XtU @ diag(1/(lam+alpha)) U^T Yc``.
    lam : (n,) float32 eigenvalues of ``Xc Xc^T`` (clipped at 0), ascending.
    U : (n, n) float32 eigenvectors.
    Xc : (n, p) float32 centred X;  K : (n, n) float32 ``Xc Xc^T``.
    """

    ops: Any
    x_mean: Any
    XtU: Any = None
    lam: Any = None
    U: Any = None
    Xc: Any = None
    K: Any = None
    #: {(alpha, rows key, need_projector): (H, h_rows, H_rows)} while :meth:`reusing_operators` is active
    _operators: dict | None = field(default=None, repr=False, compare=False)

    @contextlib.contextmanager
    def reusing_operators(self):
        """Within the block, :meth:`alpha_operators` computes each (alpha, rows) once and returns the same
        arrays again (e.g. several features fitted with one alpha; the results are identical, the O(p n^2)
        projector is built once). The cache holds about 4 * (p n + m n) bytes per alpha and is dropped on exit."""
        outer = self._operators
        if outer is None:
            self._operators = {}
        try:
            yield self
        finally:
            if outer is None:
                self._operators = None

    @property
    def method(self) -> str:
        return "eigh" if self.U is not None else "kernel"

    @property
    def n_samples(self) -> int:
        return int((self.U if self.U is not None else self.K).shape[0])

    @property
    def n_features(self) -> int:
        return int(self.XtU.shape[0] if self.XtU is not None else self.Xc.shape[1])

    def _need_eigh(self, what: str) -> None:
        if self.method != "eigh":
            raise ValueError(f"{what} needs the eigendecomposition: factorise(X, method='eigh'); this factorisation "
                             "was made with method='kernel' (one fixed alpha at a time)")

    def hat_diag(self, alpha: float):
        """Diagonal of the hat matrix (with intercept), (n,) float32 (``method="eigh"``)."""
        self._need_eigh("hat_diag")
        d = self.lam / (self.lam + alpha)
        return (self.U * self.U) @ d + 1.0 / self.n_samples

    def alpha_operators(self, alpha: float, rows: np.ndarray | None, need_projector: bool = True):
        """What one alpha needs: ``(H, h_rows, H_rows)``.

        H : (p, n) ``Xc^T (K + alpha I)^-1`` (weights ``W = H Yc``), or None when not ``need_projector``;
        h_rows : (m,) ``1 / (1 - hat_ii)`` for the leave-one-out rows (None if ``rows`` is None);
        H_rows : (m, n) those rows of the centred hat matrix ``K (K + alpha I)^-1`` (None likewise).
        """
        return self._cached(("primal", float(alpha), _rows_key(rows), bool(need_projector)),
                            lambda: self._alpha_operators(alpha, rows, need_projector))

    def _cached(self, key: tuple, make: Callable[[], Any]):
        """``make()``, computed once per key while :meth:`reusing_operators` is active, else every call."""
        if self._operators is None:
            return make()
        hit = self._operators.get(key)
        if hit is None:
            hit = self._operators[key] = make()
        return hit

    def mean_eigenvalue(self) -> float:
        """``trace(K) / n``: the mean eigenvalue of the centred kernel ``K = Xc Xc^T`` (the mean squared row norm
        of Xc), the scale against which an alpha counts as large (:meth:`dual_operators`)."""
        if self.method == "eigh":
            return float(self.lam.sum()) / self.n_samples
        return float(self.ops.diagonal(self.K).sum()) / self.n_samples

    def dual_form(self, alpha: float) -> str:
        """Which dual factors :meth:`dual_operators` uses for ``alpha``: ``"targets"`` when alpha >= the kernel's
        mean eigenvalue (:meth:`mean_eigenvalue`), else ``"whitened"``."""
        return "targets" if float(alpha) >= self.mean_eigenvalue() else "whitened"

    def dual_operators(self, alpha: float, rows: np.ndarray | None):
        """What the dual form needs for one alpha: ``(whiten, G, R_rows, h_rows)``, with ``W = G^T C`` and
        ``C = whiten(Yc)`` (or ``C = Yc`` itself when ``whiten`` is None).

        Two factorings of ``W = Xc^T (K + alpha I)^-1 Yc``, chosen by :meth:`dual_form`:

        * ``"whitened"`` (small alpha): with a factor ``F`` of ``(K + alpha I)^-1 = F^T F`` (n, n),
          ``G = F Xc`` (n, p) and ``C = F Yc`` (n, n_targets). ``F`` is ``L^-1`` from the Cholesky factor
          ``K + alpha I = L L^T`` ("kernel") or ``diag(1/sqrt(lam + alpha)) U^T`` ("eigh"). Unlike the plain
          dual coefficients ``(K + alpha I)^-1 Yc``, whose float16 rounding is amplified by the cancellation in
          ``Xc^T A`` at small alpha, ``G`` and ``C`` carry the square root of the shrinkage each, so float16
          storage costs about what it costs the primal weights. Per target: a triangular solve (n^2 flops) or
          a GEMM (2 n^2).
        * ``"targets"`` (alpha >= the kernel's mean eigenvalue, as the paper's alphas are for NSD's z-scored
          voxels): ``G = (K + alpha I)^-1 Xc`` and ``C = Yc``. All the shrinkage sits in ``G``, which is
          computed once per alpha; the targets are stored as they are, so a target costs no solve at all
          (only its centring, the float16 store and the leave-one-out rows). Why the threshold: once alpha
          dominates the spectrum, ``(K + alpha I)^-1`` is well conditioned and rounding ``Yc`` to float16
          costs no more than rounding ``C = F Yc``; measured on the test's data, the error of the targets
          form against the exact solution was 0.6-0.9x the whitened form's at alpha = 1-4x the mean
          eigenvalue, and 1.2-1.5x at 0.25-0.5x.

        whiten : callable ``yc (n, b), out=None -> C (n, b)`` (``out``: a buffer (n, b) it may write C into),
        or None for the targets form;
        G : (n, p); R_rows : (m, n) with the dual coefficients' rows ``((K + alpha I)^-1 Yc)[rows] = R_rows C``
        (the train residuals are alpha times those, so leave-one-out statistics need 2 m n flops per target);
        h_rows : (m,) ``1 / (1 - hat_ii)``. R_rows and h_rows are None when ``rows`` is None.
        Cached like :meth:`alpha_operators` inside :meth:`reusing_operators`.
        """
        return self._cached(("dual", float(alpha), _rows_key(rows)), lambda: self._dual_operators(alpha, rows))

    def _dual_operators(self, alpha: float, rows: np.ndarray | None):
        ops, n = self.ops, self.n_samples
        targets_form = self.dual_form(alpha) == "targets"
        if self.method == "eigh":
            if targets_form:
                inv = 1.0 / (self.lam + alpha)
                G = self.U @ (self.XtU.T * inv[:, None])  # (K + alpha I)^-1 Xc = U diag(inv) U^T Xc
                whiten = None
                R_rows = None if rows is None else (ops.index(self.U, rows) * inv) @ self.U.T  # (m, n)
            else:
                f = 1.0 / ops.sqrt(self.lam + alpha)  # (n,) F = diag(f) U^T
                G = self.XtU.T * f[:, None]
                Ut = self.U.T

                def whiten(yc, out=None):
                    return (Ut @ yc) * f[:, None]

                R_rows = None if rows is None else ops.index(self.U, rows) * f  # (m, n) = U[rows] diag(f)
            if rows is None:
                return whiten, G, None, None
            return whiten, G, R_rows, ops.index(1.0 / (1.0 - self.hat_diag(alpha)), rows)
        A = self.K * 1.0  # a copy: the factorisation works in place
        ops.diagonal_add(A, alpha)
        L = ops.cholesky(A)
        del A
        G = ops.solve_lower(L, self.Xc)
        if targets_form:
            G = ops.solve_lower_t(L, G)  # (K + alpha I)^-1 Xc, two triangular solves (2 n^2 p flops)
            whiten = None
        else:
            def whiten(yc, out=None):
                return ops.solve_lower(L, yc, out=out)

        if rows is None:
            return whiten, G, None, None
        # only the leave-one-out rows' columns of F = L^-1 are needed: L^-1 E (n, m), n^2 m flops
        unit = np.zeros((n, len(rows)), dtype=np.float32)
        unit[rows, np.arange(len(rows))] = 1.0
        F_cols = ops.solve_lower(L, ops.asarray(unit))
        del unit
        diag_inv = ops.col_mean(ops.square(F_cols)) * n  # diag((K + alpha I)^-1)[rows] = column norms^2
        # ((K + alpha I)^-1)[rows] = F_cols^T F: applied to C = F Yc as it is (whitened), or formed (targets:
        # (L^-T F_cols)^T, another n^2 m)
        R_rows = (ops.solve_lower_t(L, F_cols) if targets_form else F_cols).T  # (m, n)
        # 1 - hat_ii = 1 - (1 + 1/n - alpha diag(F^T F)_ii), already at the rows
        return whiten, G, R_rows, 1.0 / (alpha * diag_inv - 1.0 / n)

    def _alpha_operators(self, alpha: float, rows: np.ndarray | None, need_projector: bool):
        ops, n = self.ops, self.n_samples
        if self.method == "eigh":
            inv = 1.0 / (self.lam + alpha)
            proj = (self.XtU * inv) @ self.U.T if need_projector else None
            if rows is None:
                return proj, None, None
            h_rows = ops.index(1.0 / (1.0 - self.hat_diag(alpha)), rows)
            H_rows = (ops.index(self.U, rows) * (self.lam * inv)) @ self.U.T
            return proj, h_rows, H_rows
        A = self.K * 1.0  # a copy: the Cholesky inverse works in place
        ops.diagonal_add(A, alpha)
        Ainv = ops.cho_inverse(A)
        del A
        proj = self.Xc.T @ Ainv if need_projector else None
        if rows is None:
            return proj, None, None
        one_minus_hat = alpha * ops.diagonal(Ainv) - 1.0 / n  # 1 - (1 + 1/n - alpha diag(Ainv))
        h_rows = ops.index(1.0 / one_minus_hat, rows)
        unit = np.zeros((len(rows), n), dtype=np.float32)
        unit[np.arange(len(rows)), rows] = 1.0
        H_rows = ops.asarray(unit) - alpha * ops.index(Ainv, rows)
        return proj, h_rows, H_rows


def _rows_key(rows: np.ndarray | None) -> bytes | None:
    return None if rows is None else np.asarray(rows, np.int64).tobytes()


FACTORISATIONS: tuple[str, ...] = ("eigh", "kernel")
#: how :func:`fit_ridge` computes and stores full weights (see its ``form``)
FORMS: tuple[str, ...] = ("auto", "primal", "dual")


def factorise(X, *, backend: str = "auto", method: str = "eigh") -> RidgeFactorisation:
    """Centre X (n, p) and reduce it once for all targets: ``method`` "eigh" (every alpha: cross-validation,
    low rank) or "kernel" (alphas fixed in advance; no eigendecomposition). See the module docstring.

    Cost: "eigh" O(n^2 p + n^3) (the eigensolver); "kernel" 2 n^2 p here, then O(n^3) per alpha in the fit.
    Memory about 4 * (n p + 2 n^2) bytes (X itself is not kept).
    """
    if isinstance(X, RidgeFactorisation):
        return X
    if method not in FACTORISATIONS:
        raise ValueError(f"'method' must be one of {list(FACTORISATIONS)}; {method!r} was provided")
    ops = _get_ops(backend)
    shape = tuple(X.shape)
    if len(shape) != 2 or shape[0] < 2:
        raise ValueError(f"'X' must be 2-D (n_samples >= 2, n_features); shape {shape} was provided")
    Xb = ops.asarray(X)
    if not bool(torch.isfinite(Xb).all() if isinstance(Xb, torch.Tensor) else np.isfinite(Xb).all()):
        raise ValueError("'X' contains NaN or infinite values")
    x_mean = Xb.mean(0)
    Xc = Xb - x_mean
    del Xb
    K = Xc @ Xc.T
    if method == "kernel":
        return RidgeFactorisation(ops=ops, x_mean=x_mean, Xc=Xc, K=K)
    lam, U = ops.eigh(K)
    del K
    lam = ops.maximum(lam, 0.0)
    XtU = Xc.T @ U
    del Xc
    return RidgeFactorisation(ops=ops, x_mean=x_mean, XtU=XtU, lam=lam, U=U)


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"'alpha' must be a positive number; {alpha!r} was provided") from None
    if not a > 0 or not math.isfinite(a):
        raise ValueError(f"'alpha' must be a positive finite number; {alpha!r} was provided")
    return a


def _loo_rows(n: int, loo_stats: bool | int) -> np.ndarray | None:
    if loo_stats is False or loo_stats is None:
        return None
    if loo_stats is True:
        return np.arange(n)
    m = int(loo_stats)
    if m < 2:
        raise ValueError(f"'loo_stats' must be True, False or a row count >= 2; {loo_stats!r} was provided")
    if m >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed_for("ridge_loo_rows", n, m))
    return np.sort(rng.choice(n, size=m, replace=False))


# --------------------------------------------------------------------------------------------------- fit
class _TargetStats:
    """Per-target statistics filled batch by batch, each (n_targets,) float32: the train mean and std (ddof 0)
    and, with leave-one-out rows, the mean and std of the leave-one-out predictions."""

    def __init__(self, n_targets: int, with_loo: bool):
        self.y_mean = torch.empty(n_targets, dtype=torch.float32)
        self.y_std = torch.empty(n_targets, dtype=torch.float32)
        self.loo_mean = torch.empty(n_targets, dtype=torch.float32) if with_loo else None
        self.loo_std = torch.empty(n_targets, dtype=torch.float32) if with_loo else None

    def centre(self, ops, yb_np, j0: int, j1: int, buffers: "_BatchBuffers | None" = None):
        """Columns j0:j1 of Y (n, b) on the backend -> ``(mu (b,), yc (n, b))``, recording their mean and std.
        With ``buffers``, ``yc`` is written into its "yc" buffer and "scratch" is overwritten."""
        yb = ops.asarray(yb_np)
        mu = ops.col_mean(yb)
        yc = ops.sub(yb, mu, out=None if buffers is None else buffers.get("yc", j1 - j0))
        del yb
        sq = ops.square(yc, out=None if buffers is None else buffers.get("scratch", j1 - j0))
        self.y_mean[j0:j1] = ops.to_torch(mu).float()
        self.y_std[j0:j1] = ops.to_torch(ops.sqrt(ops.col_mean(sq))).float()
        return mu, yc

    def add_loo(self, ops, loo, mu, j0: int, j1: int) -> None:
        """Record the centred leave-one-out predictions ``loo`` (m, b) of columns j0:j1 (``mu``: their means)."""
        lm = loo.mean(0)
        self.loo_mean[j0:j1] = ops.to_torch(lm + mu).float()
        self.loo_std[j0:j1] = ops.to_torch(ops.sqrt(((loo - lm) ** 2).mean(0))).float()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"y_mean": self.y_mean, "y_std": self.y_std}
        if self.loo_mean is not None:
            out.update(loo_mean=self.loo_mean, loo_std=self.loo_std)
        return out


class _BatchBuffers:
    """Named float32 (n, width) work arrays reused across target batches (a narrower last batch uses the front of
    the same memory). Why: a fresh 145 MB array per step (8,859 x 4,096) is mapped and zero-filled by the kernel
    each batch; on these CPUs reuse cut centring from 35 to 12 ms a batch."""

    def __init__(self, ops, n_rows: int, width: int):
        self.ops, self.n_rows, self.width = ops, int(n_rows), int(width)
        self._arrays: dict[str, Any] = {}

    def get(self, name: str, width: int):
        full = self._arrays.get(name)
        if full is None:
            full = self._arrays[name] = self.ops.empty((self.n_rows, self.width))
        if width == self.width:
            return full
        return full.reshape(-1)[: self.n_rows * width].reshape(self.n_rows, width)


def _store_columns(ops, block, dest: torch.Tensor, dest_scale: torch.Tensor, j0: int, j1: int) -> None:
    """Store ``block`` (rows, j1 - j0) as columns j0:j1 of ``dest`` (float16/float32) divided by its per-column
    scale (:func:`_column_scale`), which goes to ``dest_scale[j0:j1]``."""
    sc = _column_scale(block)
    ops.store_scaled(block, 1.0 / sc, dest[:, j0:j1])
    dest_scale[j0:j1] = ops.to_torch(sc).float()


def _column_scale(w) -> Any:
    """Per-column max |w| (1 where a column is all zero), so that w / scale lies in [-1, 1]. As max(max, -min):
    no temporary of w's size (on these CPUs 1.6 ms for 886 x 4,096 against 2.6 ms for abs().amax(0) and 14 ms
    for torch.linalg.vector_norm(ord=inf))."""
    if isinstance(w, torch.Tensor):
        s = torch.maximum(w.amax(0), -w.amin(0))
    else:
        s = np.maximum(w.max(0), -w.min(0))
    return s + (s == 0)


def fit_ridge(
    X,
    Y,
    alpha: float,
    *,
    backend: str = "auto",
    n_targets_batch: int = 4096,
    loo_stats: bool | int = True,
    rank: int | None = None,
    lowrank: str = "weights",
    dtype: str = "float16",
    n_targets: int | None = None,
    progress: ProgressFn | None = None,
    form: str = "auto",
) -> RidgeDecoder:
    """Fit ridge with intercept from X (n, p) to every column of Y (n, n_targets).

    Parameters
    ----------
    X : array (n, p) float, or a :class:`RidgeFactorisation` from :func:`factorise` (reused across calls;
        ``method="kernel"`` for alphas fixed in advance, "eigh" for low rank). Given X itself, full weights use
        the kernel factorisation (no eigendecomposition) and low rank the eigendecomposition.
    Y : array-like (n, n_targets) sliceable by columns (numpy array, memmap, h5py dataset, tensor), or a
        callable ``Y(start, stop) -> (n, stop - start)`` together with ``n_targets``.
    alpha : ridge penalty (> 0).
    backend : "auto" (torch_cuda if available, else torch), "numpy", "torch" or "torch_cuda".
    n_targets_batch : columns of Y processed at once ("used for memory reasons", as in himalaya).
    loo_stats : True to compute leave-one-out train prediction mean/std (for ``rescale="train"``), an int m to
        estimate them on m seeded random training rows (cheaper), False to skip.
    rank : None for full weights, else store ``W ~ A @ B`` of this rank (<= n).
    lowrank : which rank-r approximation: ``"weights"`` (default) the Frobenius-optimal one of W itself,
        ``"predictions"`` the best rank-r approximation of the TRAIN predictions ``Xc W`` (what a decoder is for).
        On the benchmark's synthetic data both give the same test-prediction accuracy (0.3 scale, r = 300:
        r vs exact 0.9996-0.9999 either way).
    dtype : stored weight dtype, "float16" (default) or "float32".
    progress : optional ``progress(done, total)`` called after each batch (units: target columns; with
        ``rank`` there are two passes, so total is 2 * n_targets).
    form : how full weights are computed and stored (``rank=None`` only): ``"dual"`` the dual factors
        ``W = G^T C`` with ``G`` (n, p) and ``C`` (n, n_targets) (:meth:`RidgeFactorisation.dual_operators`):
        at alpha >= the kernel's mean eigenvalue (the paper's alphas on z-scored voxels) ``G = (K + alpha
        I)^-1 Xc`` and ``C = Yc``, no arithmetic per target beyond its centring; below it the whitened ``G = F
        Xc``, ``C = F Yc`` with ``F^T F = (K + alpha I)^-1`` (n^2 flops per target, a triangular solve), which
        keeps float16 precision there. ``"primal"``: the weights ``W = Xc^T (K + alpha I)^-1 Yc``
        (p, n_targets) (2 p n flops per target). ``"auto"`` (default): dual when n < p, which is cheaper and
        smaller then. Each adds 2 m n flops per target for the leave-one-out rows; the predictions agree to
        float rounding.

    Returns
    -------
    RidgeDecoder
    """
    if dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"'dtype' must be one of {list(_WEIGHT_DTYPES)}; {dtype!r} was provided")
    if int(n_targets_batch) < 1:
        raise ValueError(f"'n_targets_batch' must be >= 1; {n_targets_batch!r} was provided")
    alpha = _check_alpha(alpha)
    fact = X if isinstance(X, RidgeFactorisation) else factorise(
        X, backend=backend, method="kernel" if rank is None else "eigh")
    ops = fact.ops
    n = fact.n_samples
    targets = _Targets(Y, n, n_targets)
    T = targets.n_targets
    if lowrank not in ("predictions", "weights"):
        raise ValueError(f"'lowrank' must be one of ['predictions', 'weights']; {lowrank!r} was provided")
    if rank is not None and not (1 <= int(rank) <= n):
        raise ValueError(f"'rank' must be between 1 and n_samples={n}; {rank!r} was provided")
    wdt = _WEIGHT_DTYPES[dtype]
    rows = _loo_rows(n, loo_stats)
    if rank is not None:
        fact._need_eigh("low-rank fitting (rank=...)")
    if form not in FORMS:
        raise ValueError(f"'form' must be one of {list(FORMS)}; {form!r} was provided")
    if rank is None and (form == "dual" or (form == "auto" and n < fact.n_features)):
        return _fit_dual(fact, targets, alpha, rows, wdt, int(n_targets_batch), progress)
    # proj = H = Xc^T (K + alpha I)^-1 (p, n), built once for this alpha (full weights only); h_rows (m,) and the
    # rows H_rows (m, n) of the centred hat matrix: centred train fits of the leave-one-out rows
    proj, h_rows, H_rows = fact.alpha_operators(alpha, rows, need_projector=rank is None)
    total = T * (2 if rank is not None else 1)
    done = 0

    stats = _TargetStats(T, rows is not None)
    tensors: dict[str, torch.Tensor] = {"x_mean": ops.to_torch(fact.x_mean).float()}
    if rank is None:
        # W = Xc^T (K + alpha I)^-1 Yc = proj @ Yc: one target-sized product
        weight = torch.empty((fact.n_features, T), dtype=wdt)
        weight_scale = torch.empty(T, dtype=torch.float32)
    else:
        lam, U, XtU = fact.lam, fact.U, fact.XtU
        inv = 1.0 / (lam + alpha)  # (n,)
        shrink = lam * inv  # (n,) lam / (lam + alpha)
        s = ops.sqrt(lam)
        keep = lam > (float(lam.max()) * _EIG_RTOL)
        mid = ops.where(keep, s * inv, 0.0 * s)  # (n,) diag of the middle factor M = diag(mid) U^T Yc
        G_Y = ops.zeros((n, n))  # Yc Yc^T, accumulated over target batches

    # pass 1: target and leave-one-out statistics; full weights, or the Gram matrix of the targets
    for j0, j1, yb_np in targets.batches(int(n_targets_batch)):
        mu, yc = stats.centre(ops, yb_np, j0, j1)
        if rows is not None:
            yr = ops.index(yc, rows)
            stats.add_loo(ops, yr - h_rows[:, None] * (yr - H_rows @ yc), mu, j0, j1)  # centred LOO, (m, b)
            del yr
        if rank is None:
            _store_columns(ops, proj @ yc, weight, weight_scale, j0, j1)  # W block, (p, b)
        else:
            G_Y += yc @ yc.T
        done += j1 - j0
        if progress is not None:
            progress(done, total)

    tensors.update(stats.tensors())
    if rank is None:
        tensors.update(weight=weight, weight_scale=weight_scale)
        return RidgeDecoder(tensors, alpha=alpha, n_train=n)

    # low rank: M M^T = diag(mid) U^T (Yc Yc^T) U diag(mid); its top-r eigenvectors P (n, r) give
    # A = Xc^T U diag(1/s) P (p, r) and B = P^T M = R @ Yc with R = P^T diag(mid) U^T (r, n)
    r = int(rank)
    # ("predictions": the same with diag(s * mid) = diag(lam / (lam + alpha)), i.e. the top-r directions of the
    # centred train predictions Xc W = U diag(s) M, and A = Xc^T U diag(1/lam) P, R = P^T diag(s * mid) U^T)
    weight_of = mid if lowrank == "weights" else ops.where(keep, shrink, 0.0 * s)
    Gm = (U.T @ G_Y) @ U
    del G_Y
    Gm = (Gm * weight_of[:, None]) * weight_of[None, :]
    _, P = ops.eigh(0.5 * (Gm + Gm.T))
    del Gm
    P = P[:, n - r:]  # eigh sorts ascending: keep the last r
    inv_s = ops.where(keep, 1.0 / ops.maximum(s, 1e-30), 0.0 * s)
    back = inv_s if lowrank == "weights" else inv_s * inv_s  # diag mapping P back to W's voxel space
    A = XtU @ (back[:, None] * P)  # (p, r)
    R = (P * weight_of[:, None]).T @ U.T  # (r, n)
    a_scale = _column_scale(A)
    b = torch.empty((r, T), dtype=wdt)
    b_scale = torch.empty(T, dtype=torch.float32)
    for j0, j1, yb_np in targets.batches(int(n_targets_batch)):
        yb = ops.asarray(yb_np)
        _store_columns(ops, R @ (yb - yb.mean(0)), b, b_scale, j0, j1)  # B block, (r, b)
        done += j1 - j0
        if progress is not None:
            progress(done, total)
    tensors.update(
        factor_a=ops.to_torch(A / a_scale, wdt), factor_a_scale=ops.to_torch(a_scale).float(),
        factor_b=b, factor_b_scale=b_scale,
    )
    return RidgeDecoder(tensors, alpha=alpha, n_train=n)


def _fit_dual(fact: RidgeFactorisation, targets: "_Targets", alpha: float, rows: np.ndarray | None,
              wdt: torch.dtype, n_targets_batch: int, progress: ProgressFn | None) -> RidgeDecoder:
    """:func:`fit_ridge` in the dual form (``W = G^T C``, see :meth:`RidgeFactorisation.dual_operators`): ``C``
    (``Yc`` itself, or whitened ``F Yc`` at small alpha) streamed over target batches."""
    ops, n, T = fact.ops, fact.n_samples, targets.n_targets
    whiten, G, R_rows, h_rows = fact.dual_operators(alpha, rows)
    g_scale = _column_scale(G.T)  # per row of G, so float16 keeps every row's precision
    dual_x = torch.empty(tuple(G.shape), dtype=wdt)
    ops.store_scaled(G, 1.0 / g_scale[:, None], dual_x)
    tensors: dict[str, torch.Tensor] = {
        "x_mean": ops.to_torch(fact.x_mean).float(), "dual_x": dual_x, "dual_x_scale": ops.to_torch(g_scale).float()}
    stats = _TargetStats(T, rows is not None)
    coef = torch.empty((n, T), dtype=wdt)
    coef_scale = torch.empty(T, dtype=torch.float32)
    buffers = _BatchBuffers(ops, n, min(n_targets_batch, T))
    for j0, j1, yb_np in targets.batches(n_targets_batch):
        mu, yc = stats.centre(ops, yb_np, j0, j1, buffers)
        cb = yc if whiten is None else whiten(yc, out=buffers.get("scratch", j1 - j0))  # (n, b)
        if rows is not None:
            # train residuals are alpha (K + alpha I)^-1 yc; loo_i = y_i - r_i / (1 - hat_ii); centred, (m, b)
            stats.add_loo(ops, ops.index(yc, rows) - (alpha * h_rows)[:, None] * (R_rows @ cb), mu, j0, j1)
        _store_columns(ops, cb, coef, coef_scale, j0, j1)
        del cb, yc
        if progress is not None:
            progress(j1, T)
    tensors.update(stats.tensors(), dual_coef=coef, dual_coef_scale=coef_scale)
    return RidgeDecoder(tensors, alpha=alpha, n_train=n)


def choose_alpha(
    X,
    Y,
    alphas,
    *,
    backend: str = "auto",
    n_targets_batch: int = 4096,
    n_targets: int | None = None,
) -> tuple[float, dict[float, float]]:
    """Pick one alpha for all targets by exact leave-one-out on the shared eigendecomposition.

    For each alpha the LOO residual is ``r_i / (1 - H_ii)``; the score is the LOO R^2
    (``1 - sum loo_residual^2 / sum (y - mean y)^2``) averaged over targets (constant targets skipped).
    Cost per alpha: O(n^2 n_targets). Returns ``(best_alpha, {alpha: mean LOO R^2})``.
    """
    alist = [_check_alpha(a) for a in np.atleast_1d(np.asarray(alphas, dtype=np.float64))]
    if not alist:
        raise ValueError("'alphas' must hold at least one value; none were provided")
    fact = X if isinstance(X, RidgeFactorisation) else factorise(X, backend=backend)
    fact._need_eigh("choose_alpha (every alpha from one factorisation)")
    ops = fact.ops
    n = fact.n_samples
    targets = _Targets(Y, n, n_targets)
    sums = np.zeros(len(alist))
    count = 0
    hs = [1.0 / (1.0 - fact.hat_diag(a)) for a in alist]
    for _, _, yb_np in targets.batches(int(n_targets_batch)):
        yb = ops.asarray(yb_np)
        yc = yb - yb.mean(0)
        sst = (yc * yc).sum(0)
        valid = sst > 0
        Q = fact.U.T @ yc
        nv = int(valid.sum())
        count += nv
        for k, a in enumerate(alist):
            fitted = fact.U @ ((fact.lam / (fact.lam + a))[:, None] * Q)
            res = (yc - fitted) * hs[k][:, None]
            r2 = 1.0 - (res * res).sum(0) / ops.where(valid, sst, sst * 0 + 1.0)
            sums[k] += float((r2 * valid).sum())
    if count == 0:
        raise ValueError("'Y' has no non-constant target column; cannot score alphas")
    scores = {a: float(sums[k] / count) for k, a in enumerate(alist)}
    best = max(scores, key=scores.get)
    return best, scores
