"""A fitted ridge decoder (:class:`RidgeDecoder`): compact storage in three forms and prediction with the
rescaling modes. Fitting is :func:`brain_diffuser_core.ridge.fit_ridge`."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

RESCALE_MODES: tuple[str, ...] = ("train", "paper", "none")


class RidgeDecoder:
    """A fitted ridge decoder: X (n, p) -> predictions (n, n_targets), weights stored compactly.

    Tensors (all CPU torch): ``x_mean`` (p,), ``y_mean``/``y_std`` (n_targets,) train target mean/std
    (ddof 0), ``loo_mean``/``loo_std`` (n_targets,) leave-one-out train prediction mean/std (absent if fitted
    with ``loo_stats=False``), and the weights in one of three forms (:attr:`form`):

    - ``"primal"``: ``weight`` (p, n_targets) with ``weight_scale`` (n_targets,); ``W = weight * scale``;
    - ``"lowrank"``: ``factor_a`` (p, r) with ``factor_a_scale`` (r,) and ``factor_b`` (r, n_targets) with
      ``factor_b_scale`` (n_targets,); ``W ~ A @ B``;
    - ``"dual"``: ``dual_x`` (n_train, p) with ``dual_x_scale`` (n_train,), the centred training X, and
      ``dual_coef`` (n_train, n_targets) with ``dual_coef_scale`` (n_targets,); ``W = Xc^T A`` is never
      formed: a prediction is ``((X - x_mean) Xc^T) A + y_mean``. Smaller and cheaper to fit than ``"primal"``
      when n_train < p (NSD: 8,859 trials < 12,682-15,724 voxels).

    Stored weights are float16 or float32; scales are float32 (per column, or per training row for ``dual_x``).

    Optional (bundles of format >= 3, :meth:`add_target_axes`): ``target_axes`` (n_targets, k) float16, the
    training targets' top principal axes, ``target_axes_var`` (k,) their variances and ``target_residual_var``
    (1,) the mean variance per other dimension, so :meth:`target_sd_along` tells how far training features
    spread along any direction (:mod:`brain_diffuser_core.target_axes`).
    """

    _FORM_TENSORS = {
        "primal": ("weight", "weight_scale"),
        "lowrank": ("factor_a", "factor_a_scale", "factor_b", "factor_b_scale"),
        "dual": ("dual_x", "dual_x_scale", "dual_coef", "dual_coef_scale"),
    }

    def __init__(self, tensors: Mapping[str, torch.Tensor], alpha: float, n_train: int):
        self.tensors = {k: v.detach().cpu() for k, v in tensors.items()}
        self.alpha = float(alpha)
        self.n_train = int(n_train)
        form = "dual" if "dual_coef" in self.tensors else "lowrank" if "factor_a" in self.tensors else "primal"
        need = ["x_mean", "y_mean", "y_std", *self._FORM_TENSORS[form]]
        missing = [k for k in need if k not in self.tensors]
        if missing:
            raise ValueError(f"ridge decoder state is missing tensors {missing}")
        self.form = form
        p, t = self.n_features, self.n_targets
        expect = {"x_mean": (p,), "y_mean": (t,), "y_std": (t,), "loo_mean": (t,), "loo_std": (t,),
                  "target_residual_var": (1,)}
        if "target_axes" in self.tensors:
            k = int(self.tensors["target_axes"].shape[-1])
            expect.update(target_axes=(t, k), target_axes_var=(k,))
            if "target_axes_var" not in self.tensors or "target_residual_var" not in self.tensors:
                raise ValueError("ridge decoder state has 'target_axes' without 'target_axes_var' and "
                                 "'target_residual_var'")
        if form == "lowrank":
            r = self.rank
            expect.update(factor_a=(p, r), factor_a_scale=(r,), factor_b=(r, t), factor_b_scale=(t,))
        elif form == "dual":
            m = self.n_train
            expect.update(dual_x=(m, p), dual_x_scale=(m,), dual_coef=(m, t), dual_coef_scale=(t,))
        else:
            expect.update(weight=(p, t), weight_scale=(t,))
        for k, shp in expect.items():
            if k in self.tensors and tuple(self.tensors[k].shape) != shp:
                raise ValueError(
                    f"ridge decoder tensor {k!r} must have shape {shp}; {tuple(self.tensors[k].shape)} was found"
                )

    # -- shape info
    @property
    def n_features(self) -> int:
        return int(self.tensors["x_mean"].shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.tensors["y_mean"].shape[0])

    @property
    def rank(self) -> int | None:
        return int(self.tensors["factor_a"].shape[1]) if "factor_a" in self.tensors else None

    @property
    def has_loo_stats(self) -> bool:
        return "loo_mean" in self.tensors

    @property
    def has_target_axes(self) -> bool:
        return "target_axes" in self.tensors

    def add_target_axes(self, axes: np.ndarray, variances: np.ndarray) -> None:
        """Keep the training targets' principal axes (n_targets, k) and variances (k,)
        (:func:`~brain_diffuser_core.target_axes.principal_axes`); the residual variance per other dimension
        comes from ``y_std``. Axes are stored float16 (unit columns: entries ~ 1/sqrt(n_targets))."""
        axes = np.asarray(axes, np.float32)
        var = np.asarray(variances, np.float64).reshape(-1)
        if axes.ndim != 2 or axes.shape[0] != self.n_targets or var.shape != (axes.shape[1],):
            raise ValueError(f"'axes' must be ({self.n_targets}, k) and 'variances' (k,); {axes.shape} and "
                             f"{var.shape} were provided")
        total = float((self.tensors["y_std"].double() ** 2).sum())
        rest = max(0, self.n_targets - axes.shape[1])
        residual = max(total - float(var.sum()), 0.0) / rest if rest else 0.0
        self.tensors.update(target_axes=torch.from_numpy(axes.astype(np.float16)),
                            target_axes_var=torch.from_numpy(var.astype(np.float32)),
                            target_residual_var=torch.tensor([residual], dtype=torch.float32))

    def target_sd_along(self, direction: np.ndarray) -> float:
        """Standard deviation of the training targets along ``direction`` (n_targets,), from the principal axes
        (:func:`~brain_diffuser_core.target_axes.sd_along`); ValueError when the decoder has none."""
        from .target_axes import sd_along

        if not self.has_target_axes:
            raise ValueError("this decoder has no principal axes of its training targets (fitted before bundle "
                             "format 3); refit it with `python -m brain_diffuser_core fit`")
        t = self.tensors
        return sd_along(t["target_axes"].numpy(), t["target_axes_var"].numpy(),
                        float(t["target_residual_var"].reshape(-1)[0]), direction)

    @property
    def weight_dtype(self) -> str:
        t = self.tensors[self._FORM_TENSORS[self.form][0]]
        return str(t.dtype).replace("torch.", "")

    @property
    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.tensors.values()))

    # -- (de)serialisation
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain contiguous CPU tensors (safetensors-ready); alpha and n_train as 1-element float64/int64."""
        out = {k: v.contiguous() for k, v in self.tensors.items()}
        out["alpha"] = torch.tensor([self.alpha], dtype=torch.float64)
        out["n_train"] = torch.tensor([self.n_train], dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "RidgeDecoder":
        for key in ("alpha", "n_train"):
            if key not in state:
                raise ValueError(f"ridge decoder state is missing {key!r}")
        tensors = {k: v for k, v in state.items() if k not in ("alpha", "n_train")}
        return cls(tensors, alpha=float(state["alpha"].reshape(-1)[0]), n_train=int(state["n_train"].reshape(-1)[0]))

    def dense_weight(self) -> torch.Tensor:
        """The float32 weight matrix (p, n_targets). Materialises it: for tests and small decoders only."""
        t = self.tensors
        if self.form == "primal":
            return t["weight"].float() * t["weight_scale"]
        if self.form == "dual":
            return self._dual_x(torch.device("cpu")).T @ (t["dual_coef"].float() * t["dual_coef_scale"])
        return (t["factor_a"].float() * t["factor_a_scale"]) @ (t["factor_b"].float() * t["factor_b_scale"])

    def _dual_x(self, dev: torch.device) -> torch.Tensor:
        """(n_train, p) float32 centred training X of a dual-form decoder, on ``dev``."""
        t = self.tensors
        return t["dual_x"].to(dev).float() * t["dual_x_scale"].to(dev)[:, None]

    # -- prediction
    def predict(self, X, rescale: str = "none", *, n_targets_batch: int = 4096, device: str = "cpu") -> np.ndarray:
        """Predict targets for X (m, p). Returns float32 numpy (m, n_targets).

        ``rescale``: ``"none"`` (default: the plain ridge prediction ``(X - x_mean) W + y_mean``), ``"train"``
        (leave-one-out train statistics; no test peeking) or ``"paper"`` (z-score across this batch of
        predictions, as in the original scripts). Callers that rescale say so (the pipeline does).
        """
        if rescale not in RESCALE_MODES:
            raise ValueError(f"'rescale' must be one of {list(RESCALE_MODES)}; {rescale!r} was provided")
        if rescale == "train" and not self.has_loo_stats:
            raise ValueError("rescale='train' needs leave-one-out statistics; this decoder was fitted with loo_stats=False")
        Xt = torch.as_tensor(np.asarray(X, dtype=np.float32) if not isinstance(X, torch.Tensor) else X)
        if Xt.ndim == 1:
            Xt = Xt[None]
        if Xt.ndim != 2 or Xt.shape[1] != self.n_features:
            raise ValueError(
                f"'X' must have shape (n_samples, {self.n_features}) (one column per voxel); "
                f"{tuple(Xt.shape)} was provided"
            )
        dev = torch.device(device)
        t = self.tensors
        Xc = (Xt.to(dev, torch.float32) - t["x_mean"].to(dev))
        m, T = Xc.shape[0], self.n_targets
        out = np.empty((m, T), dtype=np.float32)
        if self.form == "lowrank":
            Z, right, right_scale = (Xc @ (t["factor_a"].to(dev).float() * t["factor_a_scale"].to(dev)),
                                     t["factor_b"], t["factor_b_scale"])
        elif self.form == "dual":
            Z, right, right_scale = Xc @ self._dual_x(dev).T, t["dual_coef"], t["dual_coef_scale"]  # Z: (m, n_train)
        else:
            Z, right, right_scale = Xc, t["weight"], t["weight_scale"]
        for j0 in range(0, T, n_targets_batch):
            j1 = min(j0 + n_targets_batch, T)
            pred = (Z @ right[:, j0:j1].to(dev).float()) * right_scale[j0:j1].to(dev)
            pred = pred + t["y_mean"][j0:j1].to(dev)
            out[:, j0:j1] = pred.cpu().numpy()
        return self._rescale(out, rescale)

    def _rescale(self, pred: np.ndarray, rescale: str) -> np.ndarray:
        if rescale == "none":
            return pred
        y_mean = self.tensors["y_mean"].numpy()
        y_std = self.tensors["y_std"].numpy()
        if rescale == "train":
            mu, sd = self.tensors["loo_mean"].numpy(), self.tensors["loo_std"].numpy()
        else:
            if pred.shape[0] < 2:
                raise ValueError("rescale='paper' z-scores across the predicted batch and needs >= 2 rows; 1 was provided")
            mu, sd = pred.mean(0), pred.std(0)
        sd = np.where(sd > 0, sd, 1.0).astype(np.float32)
        return ((pred - mu) / sd * y_std + y_mean).astype(np.float32, copy=False)
