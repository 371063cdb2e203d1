"""Array backends of the ridge solver (numpy / torch / torch on CUDA, as himalaya's switch) and the streamed
target source: column batches of Y from an array, a memmap, an h5py dataset, a tensor or a callable."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

BACKENDS: tuple[str, ...] = ("auto", "numpy", "torch", "torch_cuda")


# --------------------------------------------------------------------------------------------- backends
class _NumpyOps:
    name = "numpy"

    def asarray(self, a) -> np.ndarray:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        return np.ascontiguousarray(np.asarray(a), dtype=np.float32)

    def to_torch(self, a, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t if dtype is None else t.to(dtype)

    def eigh(self, a):
        return np.linalg.eigh(a)

    def maximum(self, a, value: float):
        return np.maximum(a, value)

    def sqrt(self, a):
        return np.sqrt(a)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def zeros(self, shape):
        return np.zeros(shape, dtype=np.float32)

    def index(self, a, rows: np.ndarray):
        return a[rows]

    def cho_inverse(self, a):
        """Inverse of a symmetric positive definite matrix (overwritten) through its Cholesky factor."""
        from scipy.linalg import lapack

        c, info = lapack.spotrf(a, lower=1, overwrite_a=1)
        if info == 0:
            c, info = lapack.spotri(c, lower=1, overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"Cholesky inverse failed (LAPACK info {info}): K + alpha I is not "
                                        "positive definite in float32; use a larger alpha or method='eigh'")
        return np.tril(c) + np.tril(c, -1).T

    def diagonal(self, a):
        return np.ascontiguousarray(np.diagonal(a))

    def cholesky(self, a):
        """Lower Cholesky factor of a symmetric positive definite matrix (overwritten)."""
        from scipy.linalg import lapack

        c, info = lapack.spotrf(a, lower=1, overwrite_a=1, clean=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"Cholesky factorisation failed (LAPACK info {info}): K + alpha I is not "
                                        "positive definite in float32; use a larger alpha or method='eigh'")
        return c

    def diagonal_add(self, a, value: float) -> None:
        a[np.diag_indices_from(a)] += np.float32(value)

    def solve_lower(self, L, b, out=None):
        """L^-1 b for lower-triangular L (n, n) and b (n, k) (``out`` is ignored: scipy has none)."""
        from scipy.linalg import solve_triangular

        return solve_triangular(L, b, lower=True, check_finite=False)

    def solve_lower_t(self, L, b):
        """L^-T b for lower-triangular L (n, n) and b (n, k)."""
        from scipy.linalg import solve_triangular

        return solve_triangular(L, b, lower=True, trans="T", check_finite=False)

    def empty(self, shape):
        return np.empty(shape, dtype=np.float32)

    def col_mean(self, a):
        """Column means of a (n, k) as a matrix-vector product (faster than a reduction down the columns)."""
        return np.ones(a.shape[0], dtype=np.float32) @ a / np.float32(a.shape[0])

    def sub(self, a, v, out=None):
        """a - v[None, :], into ``out`` (same shape as a) when given."""
        return np.subtract(a, v, out=out)

    def square(self, a, out=None):
        return np.multiply(a, a, out=out)

    def store_scaled(self, a, factor, dest: torch.Tensor) -> None:
        """``dest[...] = a * factor`` (factor broadcast against a: per column (k,) or per row (n, 1)) cast to
        dest's dtype (a CPU tensor, e.g. a column block of the stored weights), in one pass."""
        np.multiply(a, factor, out=dest.numpy(), casting="same_kind")


class _TorchOps:
    def __init__(self, device: str):
        self.device = torch.device(device)
        self.name = "torch_cuda" if self.device.type == "cuda" else "torch"

    def asarray(self, a) -> torch.Tensor:
        if not isinstance(a, torch.Tensor):
            a = torch.from_numpy(np.ascontiguousarray(np.asarray(a), dtype=np.float32))
        return a.to(device=self.device, dtype=torch.float32)

    def to_torch(self, a, dtype: torch.dtype | None = None) -> torch.Tensor:
        # cast on the device first: a float16 block crosses to the host at half the bytes
        return (a.detach() if dtype is None else a.detach().to(dtype)).cpu()

    def eigh(self, a):
        return torch.linalg.eigh(a)

    def maximum(self, a, value: float):
        return torch.clamp(a, min=value)

    def sqrt(self, a):
        return torch.sqrt(a)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def zeros(self, shape):
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def index(self, a, rows: np.ndarray):
        return a[torch.as_tensor(rows, device=self.device)]

    def cho_inverse(self, a):
        """Inverse of a symmetric positive definite matrix through its Cholesky factor."""
        L, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            raise torch.linalg.LinAlgError(f"Cholesky inverse failed (leading minor {int(info)}): K + alpha I is "
                                           "not positive definite in float32; use a larger alpha or method='eigh'")
        return torch.cholesky_inverse(L)

    def diagonal(self, a):
        return torch.diagonal(a).contiguous()

    def cholesky(self, a):
        """Lower Cholesky factor of a symmetric positive definite matrix."""
        L, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            raise torch.linalg.LinAlgError(f"Cholesky factorisation failed (leading minor {int(info)}): K + alpha I "
                                           "is not positive definite in float32; use a larger alpha or method='eigh'")
        return L

    def diagonal_add(self, a, value: float) -> None:
        a.diagonal().add_(float(value))

    def solve_lower(self, L, b, out=None):
        """L^-1 b for lower-triangular L (n, n) and b (n, k), into ``out`` (n, k) when given."""
        return torch.linalg.solve_triangular(L, b, upper=False, out=out)

    def solve_lower_t(self, L, b):
        """L^-T b for lower-triangular L (n, n) and b (n, k)."""
        return torch.linalg.solve_triangular(L.mT, b, upper=True)

    def empty(self, shape):
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def col_mean(self, a):
        """Column means of a (n, k) as a matrix-vector product (on 2 CPU threads 3.5 ms for 8,859 x 4,096,
        against 10 ms for ``a.mean(0)``)."""
        return (torch.ones(1, a.shape[0], dtype=a.dtype, device=a.device) @ a)[0] / a.shape[0]

    def sub(self, a, v, out=None):
        """a - v[None, :], into ``out`` (same shape as a) when given."""
        return torch.sub(a, v, out=out)

    def square(self, a, out=None):
        return torch.mul(a, a, out=out)

    def store_scaled(self, a, factor, dest: torch.Tensor) -> None:
        """``dest[...] = a * factor`` (factor broadcast against a: per column (k,) or per row (n, 1)) cast to
        dest's dtype (a CPU tensor, e.g. a column block of the stored weights). On the CPU one fused pass:
        scaling, casting and the strided store apart took 290 ms for 8,859 x 4,096 on 2 threads, fused 55 ms."""
        if dest.device == self.device:
            torch.mul(a, factor, out=dest)
        else:  # cast on the device first: the block crosses to the host at the stored dtype's size
            dest.copy_((a * factor).to(dest.dtype))


def _get_ops(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"'backend' must be one of {list(BACKENDS)}; {backend!r} was provided")
    if backend == "auto":
        backend = "torch_cuda" if torch.cuda.is_available() else "torch"
    if backend == "numpy":
        return _NumpyOps()
    if backend == "torch_cuda":
        if not torch.cuda.is_available():
            raise ValueError("'backend' is 'torch_cuda' but no CUDA device is available; use 'torch' or 'auto'")
        return _TorchOps("cuda")
    return _TorchOps("cpu")


# ------------------------------------------------------------------------------------------ target source
class _Targets:
    """Column batches of Y from an array-like (numpy array, memmap, h5py dataset, tensor) or a callable."""

    def __init__(self, Y: Any, n_samples: int, n_targets: int | None):
        self._fn: Callable[[int, int], Any] | None = None
        if callable(Y) and not hasattr(Y, "shape"):
            if n_targets is None:
                raise ValueError("'n_targets' is required when 'Y' is a callable Y(start, stop) -> (n, stop-start)")
            self._fn = Y
            self.n_targets = int(n_targets)
        else:
            shape = tuple(Y.shape)
            if len(shape) == 1:
                Y = np.asarray(Y).reshape(-1, 1)
                shape = Y.shape
            if len(shape) != 2:
                raise ValueError(f"'Y' must be 2-D (n_samples, n_targets); shape {shape} was provided")
            if shape[0] != n_samples:
                raise ValueError(
                    f"'Y' must have {n_samples} rows (one per row of X); {shape[0]} were provided"
                )
            self._Y = Y
            self.n_targets = int(shape[1])
        self.n_samples = n_samples

    def get(self, start: int, stop: int):
        """float32 (n, stop - start): numpy, or a torch tensor left on its device (a GPU source stays there)."""
        if self._fn is not None:
            block = self._fn(start, stop)
        else:
            block = self._Y[:, start:stop]
        # finite if the sum is (one reduction: 9 ms for 8,859 x 4,096 against 17 ms for isfinite().all()); a sum
        # that overflows on finite values is told apart by the full check
        if isinstance(block, torch.Tensor):
            block = block.detach().float()
            finite = bool(torch.isfinite(block.sum())) or bool(torch.isfinite(block).all())
        else:
            block = np.asarray(block, dtype=np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                total = block.sum()
            finite = bool(np.isfinite(total)) or bool(np.all(np.isfinite(block)))
        if tuple(block.shape) != (self.n_samples, stop - start):
            raise ValueError(
                f"'Y' batch [{start}:{stop}] must have shape {(self.n_samples, stop - start)}; "
                f"{tuple(block.shape)} was provided"
            )
        if not finite:
            raise ValueError(f"'Y' batch [{start}:{stop}] contains NaN or infinite values")
        return block

    def batches(self, batch: int):
        for start in range(0, self.n_targets, batch):
            stop = min(start + batch, self.n_targets)
            yield start, stop, self.get(start, stop)
