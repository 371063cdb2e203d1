"""Ridge decoders at one NSD subject's full shape, on synthetic data; and the ratio against scikit-learn.

Usage::

    python benchmarks/ridge_scale.py --skip-compare --threads 2   # full shape, three decoders, float16 (~10 min)
    python benchmarks/ridge_scale.py --scale 0.1 --threads 1      # everything shrunk 10x in n, p and targets
    python benchmarks/ridge_scale.py --skip-full           # only the comparison with the peers
    python benchmarks/ridge_scale.py --modes lowrank --method eigh   # full shape, low-rank bundle (eigh)

Parts
-----
1. Full shape (times ``--scale``): X (8,859 x 15,724) and the three decoders' targets, VDVAE 91,168,
   CLIP-text 77 x 768 = 59,136, CLIP-vision 257 x 768 = 197,376, with the paper's alphas. One
   factorisation serves the three fits: ``--method kernel`` (default: the alphas are fixed, so K = Xc Xc^T and
   a Cholesky factor per alpha suffice) or ``eigh`` (the all-alphas eigendecomposition that cross-validation and
   low rank need). ``--form`` (default auto = dual here, n < p): the dual factors ``W = G^T C``, which at the
   paper's alphas (above the kernel's mean eigenvalue) are ``G = (K + alpha I)^-1 Xc`` once per alpha and the
   centred targets ``C = Yc`` themselves (no solve per target), and below it the whitened ``C = L^-1 Yc`` (one
   triangular solve of n^2 flops per target); or the primal weights ``W = Xc^T (K + alpha I)^-1 Yc``, one
   product of 2 p n flops per target. Leave-one-out statistics come from
   ``--loo-rows`` sampled training rows (default 1,000; 0 = all). Storage modes (``--modes``): ``float16``
   (exact weights, float16, what ``fit`` writes by default) and ``lowrank`` (rank ``--rank``, float16 factors;
   needs ``--method eigh``). A float32 GEMM is timed in the same run and the fit's arithmetic (the flops the
   method needs) is printed as a fraction of its rate; a float32 triangular solve is timed too, and the fit is
   also given as a fraction of the bound the two rates set. At alpha >= the kernel's mean eigenvalue (NSD's
   chosen alphas) the dual stores ``(K + alpha I)^-1 Xc`` and plain ``Yc``: no per-target solve at all, so the
   fit is memory-bound and its fraction of GEMM reads low while its wall time falls; below it the whitened
   form's per-target triangular solve is kept for float16 precision.
   Printed: wall time and peak RSS per step, bundle size per subject for both modes (float16: from the
   decoders' bytes; low rank: a bundle really written and measured), and the correlation of the low-rank (and
   float16) test predictions with the exact float32 solution ``(X_test - mean) Xc^T (K + alpha I)^-1 Yc``.
   Targets: fit of the three decoders <= 30 min and <= 16 GB on 2 cores; bundle <= 2 GB at r >= 0.999.
2. Peers (size ``min(--scale, --compare-scale)``, default 0.1), on the same data and alphas, each in its own
   process (so each peak RSS is its own; the data's share is printed beside it): scikit-learn
   ``Ridge(alpha, fit_intercept=True)`` as the original scripts used it (float64 X and Y, solver "auto"; VDVAE
   in one fit; CLIP one fit per token, 77 and 257 fits of 768 columns each); himalaya's solvers (``KernelRidge``,
   linear kernel, "eigenvalues", on its numpy and torch backends, and ``Ridge``, "svd", numpy; the fastest is
   its best), fed float32 as ``fit_ridge`` computes; this
   project's ``fit_ridge`` with the kernel factorisation (and with eigh), float32 weights, leave-one-out
   statistics on ``--loo-rows`` rows included. Prints time, peak memory, max prediction difference (relative to
   the predictions' std, vs scikit-learn), the ratios, and the fraction of the GEMM rate. Asserts equal
   predictions (<= 1e-3 x std).

Synthetic data (seeded, documented so results can be judged)
-------------------------------------------------------------
- fMRI: ``k = 1000 * scale`` latent sources ``Z`` (n, k) ~ N(0, 1) with power-law amplitudes
  ``sigma_j = j^-0.5`` mixed into voxels by ``L`` (k, p) ~ N(0, 1/k); the signal is scaled to unit variance per
  voxel and iid noise of variance 2.3 added (signal share ~30%, as for the most visual NSD voxels), then
  every voxel z-scored with train statistics. The singular values of X thus follow a power law on top of a
  Marchenko-Pastur noise bulk, like real betas (voxels strongly correlated through shared sources).
- Targets of one feature: ``Y = (Z[:, :k_y] @ B) * scale_j + offset_j + eps``, ``k_y = 256 * scale`` (>= 8)
  decodable factors shared with the fMRI sources, ``B`` (k_y, T) with rows scaled ``i^-0.7`` (low effective
  rank, as VDVAE/CLIP features are), column scales ``exp(0.5 N(0,1))``, offsets N(0,1), and iid noise
  ``eps`` of 25% of the structured variance. Columns are generated in blocks of 1,024 from
  ``seed_for("bench", feature, block)``, so Y is never held whole (8,859 x 347,680 float32 would be 12 GB).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from brain_diffuser_core.bundle import SubjectDecoders, save_bundle  # noqa: E402
from brain_diffuser_core.config import PAPER  # noqa: E402
from brain_diffuser_core.ridge import factorise, fit_ridge  # noqa: E402
from brain_diffuser_core.seeding import seed_for  # noqa: E402

# n_test: held-out rows on which predictions are correlated (300 of the 982 keep memory low at full shape)
FULL = {"n": 8859, "p": 15724, "n_test": 300, "k": 1000, "k_y": 256}
BLOCK = 1024


def feature_layout(scale: float) -> dict[str, tuple[int, ...]]:
    d = max(4, round(PAPER.stage2.clip_dim * scale))
    return {
        "vdvae": (max(8, round(PAPER.stage1.feature_dim * scale)),),
        "clip_text": (PAPER.stage2.text_tokens, d),
        "clip_vision": (PAPER.stage2.vision_tokens, d),
    }


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class Synthetic:
    """The seeded generator described in the module docstring."""

    def __init__(self, scale: float, seed: int = 0):
        self.n = max(40, round(FULL["n"] * scale))
        self.p = max(60, round(FULL["p"] * scale))
        self.n_test = max(100, min(FULL["n_test"], round(982 * scale)))
        self.k = max(20, round(FULL["k"] * scale))
        self.k_y = max(8, round(FULL["k_y"] * scale))
        self.seed = seed
        rng = np.random.default_rng(seed_for("bench_x", seed))
        sig = np.arange(1, self.k + 1, dtype=np.float32) ** -0.5
        self.Z = rng.standard_normal((self.n + self.n_test, self.k), dtype=np.float32)
        L = rng.standard_normal((self.k, self.p), dtype=np.float32) / np.sqrt(self.k)
        X = (self.Z * sig) @ L
        X /= X.std(0)
        X += np.sqrt(2.3, dtype=np.float32) * rng.standard_normal(X.shape, dtype=np.float32)
        mu, sd = X[: self.n].mean(0), X[: self.n].std(0, ddof=1)
        X -= mu
        X /= sd
        self.X, self.X_test = X[: self.n], X[self.n:]

    def targets(self, name: str, n_targets: int, rows: slice):
        """A callable Y(start, stop) -> float32 (n_rows, stop - start) for the given rows (train or test)."""
        Zy = self.Z[rows, : self.k_y]
        row_scale = np.arange(1, self.k_y + 1, dtype=np.float32) ** -0.7
        n_rows = Zy.shape[0]
        cache: dict[int, np.ndarray] = {}

        def block(b: int) -> np.ndarray:
            if b in cache:
                return cache[b]
            rng = np.random.default_rng(seed_for("bench", name, b, base_seed=self.seed))
            width = min(BLOCK, n_targets - b * BLOCK)
            B = rng.standard_normal((self.k_y, width), dtype=np.float32) * row_scale[:, None]
            col_scale = np.exp(0.5 * rng.standard_normal(width)).astype(np.float32)
            offset = rng.standard_normal(width).astype(np.float32)
            structured = Zy @ B
            noise_sd = float(0.5 * np.sqrt((row_scale**2).sum()))  # 25% of the structured variance
            # noise drawn for all train+test rows, then sliced, so a row's value does not depend on `rows`
            eps = rng.standard_normal((self.n + self.n_test, width), dtype=np.float32)[rows] * noise_sd
            out = (structured + eps) * col_scale + offset
            cache.clear()
            cache[b] = out
            return out.astype(np.float32, copy=False)

        def Y(start: int, stop: int) -> np.ndarray:
            parts = []
            for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
                blk = block(b)
                lo, hi = max(start, b * BLOCK) - b * BLOCK, min(stop, (b + 1) * BLOCK) - b * BLOCK
                parts.append(blk[:, lo:hi])
            out = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
            assert out.shape == (n_rows, stop - start)
            return out.astype(np.float32, copy=False)

        return Y


def _exact_test_projector(fact, X_test: np.ndarray, alpha: float) -> torch.Tensor:
    """(m, n) matrix T with exact centred test predictions = T @ Yc (float32, from the same factorisation)."""
    ops = fact.ops
    proj, _, _ = fact.alpha_operators(alpha, None)  # (p, n) Xc^T (K + alpha I)^-1
    T = (ops.asarray(X_test) - fact.x_mean) @ proj
    return ops.to_torch(T).float()


def _corr_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    ac, bc = a - a.mean(0), b - b.mean(0)
    overall = float((ac * bc).sum() / np.sqrt((ac * ac).sum() * (bc * bc).sum()))
    per = (ac * bc).sum(0) / np.sqrt((ac * ac).sum(0) * (bc * bc).sum(0) + 1e-30)
    return {"r_overall": overall, "r_median": float(np.median(per)), "r_p01": float(np.percentile(per, 1))}


def run_full(args, log) -> dict:
    scale = args.scale
    torch.manual_seed(0)
    t0 = time.perf_counter()
    syn = Synthetic(scale)
    shapes = feature_layout(scale)
    res: dict = {"scale": scale, "n": syn.n, "p": syn.p, "n_test": syn.n_test, "k": syn.k, "k_y": syn.k_y,
                 "shapes": {k: list(v) for k, v in shapes.items()}, "threads": torch.get_num_threads()}
    res["generate_X_s"] = time.perf_counter() - t0
    log(f"[full x{scale}] X {syn.n} x {syn.p}, test {syn.n_test}; targets " +
        ", ".join(f"{k} {int(np.prod(v))}" for k, v in shapes.items()) + f"  (generated in {res['generate_X_s']:.1f} s)")
    res["gemm_gflops"] = gemm_gflops(args.backend)
    batch_width = widest_batch(args.batch, shapes)
    res["trsm_gflops"] = trsm_gflops(args.backend, syn.n, batch_width)
    res["form"] = form = resolve_form(args.form, syn.n, syn.p)
    log(f"  float32 GEMM (4096^3, {torch.get_num_threads()} threads): {res['gemm_gflops']:.0f} GFLOP/s; "
        f"triangular solve ({syn.n}^2 x {batch_width}): {res['trsm_gflops']:.0f} GFLOP/s; "
        f"weights form: {form}")
    t0 = time.perf_counter()
    fact = factorise(syn.X, backend=args.backend, method=args.method)
    res["factorise_s"] = time.perf_counter() - t0
    res["method"] = args.method
    log(f"  factorise ({args.method}): {res['factorise_s']:.1f} s, peak RSS {peak_rss_gb():.2f} GB")
    rank = max(1, min(syn.n, round(args.rank * scale)))
    res["rank"] = rank
    loo = loo_setting(args.loo_rows, scale)
    m_rows = syn.n if loo is True else min(int(loo), syn.n)
    def mode_form(mode, alpha=None):
        if mode != "float16":
            return "primal"  # (low rank: the primal algebra's flop count)
        if form == "dual" and alpha is not None and fact.dual_form(alpha) == "targets":
            return "dual_targets"
        return form

    flops = {m: fit_flops(syn.n, syn.p, {}, m_rows, args.method, mode_form(m)) for m in args.modes}  # factorisation
    fit_total = {m: 0.0 for m in args.modes}
    source_total = {m: 0.0 for m in args.modes}  # seconds inside the synthetic target source (generation)
    lowrank_decoders, sizes = {}, {m: 0 for m in args.modes}
    res["features"] = {}
    for name, shp in shapes.items():
        T = int(np.prod(shp))
        alpha = PAPER.ridge_alpha(name)
        Ygen = syn.targets(name, T, slice(0, syn.n))
        Tmat = _exact_test_projector(fact, syn.X_test, alpha)
        exact = np.empty((syn.n_test, T), dtype=np.float32)
        filled = np.zeros(T, dtype=bool)

        def Y(start, stop, _gen=Ygen, _T=Tmat, _ex=exact, _f=filled):
            t_in = time.perf_counter()
            yb = _gen(start, stop)
            if not _f[start:stop].all():  # exact float32 test predictions, on the fly, once per column
                mu = yb.mean(0)
                _ex[:, start:stop] = (_T @ torch.from_numpy(yb - mu)).numpy() + mu
                _f[start:stop] = True
            source_s[0] += time.perf_counter() - t_in  # the benchmark's own work, not the fit's
            return yb

        fr: dict = {"n_targets": T, "alpha": alpha, "alpha_over_mean_eigenvalue": alpha / fact.mean_eigenvalue(),
                    "dual_form": fact.dual_form(alpha)}
        for mode in args.modes:
            one = fit_flops(syn.n, syn.p, {name: T}, m_rows, args.method, mode_form(mode, alpha))
            base = fit_flops(syn.n, syn.p, {}, m_rows, args.method, mode_form(mode, alpha))
            flops[mode] = {k: flops[mode][k] + one[k] - base[k] for k in one}
            source_s = [0.0]
            t0 = time.perf_counter()
            dec = fit_ridge(fact, Y, alpha, n_targets=T, n_targets_batch=args.batch, loo_stats=loo,
                            rank=rank if mode == "lowrank" else None, dtype="float16", form=args.form)
            dt = time.perf_counter() - t0
            fit_total[mode] += dt
            source_total[mode] += source_s[0]
            pred = dec.predict(syn.X_test, rescale="none")
            fr[mode] = {"fit_s": dt, "bytes": dec.nbytes, **_corr_stats(pred, exact)}
            sizes[mode] += dec.nbytes
            log(f"  {name:11s} {mode:8s} ({mode_form(mode, alpha)}, alpha {alpha:g} = "
                f"{fr['alpha_over_mean_eigenvalue']:.2f} x the kernel's mean eigenvalue) fit {dt:7.1f} s  "
                f"{dec.nbytes / 2**30:6.3f} GiB  "
                f"r vs exact {fr[mode]['r_overall']:.5f} (median col {fr[mode]['r_median']:.5f}, "
                f"1st pct {fr[mode]['r_p01']:.5f})  peak RSS {peak_rss_gb():.2f} GB")
            if mode == "lowrank":
                lowrank_decoders[name] = dec
            del dec, pred
        res["features"][name] = fr
        del exact
    for mode in args.modes:
        res[f"fit_three_{mode}_s"] = fit_total[mode]
        res[f"fit_three_{mode}_plus_factorise_s"] = fit_total[mode] + res["factorise_s"]
        res[f"decoders_{mode}_bytes"] = sizes[mode]
    if "lowrank" in args.modes:
        tmp = Path(tempfile.mkdtemp(prefix="ridge_bench_", dir=args.tmp_dir))
        try:
            sub = SubjectDecoders(n_voxels=syn.p, mask_sha256="synthetic", decoders=lowrank_decoders)
            save_bundle(tmp / "bundle", {1: sub}, feature_shapes=shapes)
            res["bundle_lowrank_bytes"] = sum(f.stat().st_size for f in (tmp / "bundle").rglob("*") if f.is_file())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    res["peak_rss_gb"] = peak_rss_gb()
    # the GEMM rate again after the fits: these shared machines drift by +-10% within minutes, so the fraction is
    # given against both, and the aim is judged against the higher (the stricter) of the two
    res["gemm_gflops_after"] = gemm_gflops(args.backend)
    log(f"  float32 GEMM after the fits: {res['gemm_gflops_after']:.0f} GFLOP/s (before: {res['gemm_gflops']:.0f})")
    gemm_strict = max(res["gemm_gflops"], res["gemm_gflops_after"])
    for mode in args.modes:
        res[f"target_source_{mode}_s"] = source_total[mode]
        t = fit_total[mode] - source_total[mode] + res["factorise_s"]
        total = sum(flops[mode].values())
        res[f"tflop_{mode}"] = total / 1e12
        res[f"fraction_of_gemm_{mode}"] = total / t / (gemm_strict * 1e9)
        res[f"fraction_of_gemm_before_after_{mode}"] = [total / t / (res[k] * 1e9)
                                                        for k in ("gemm_gflops", "gemm_gflops_after")]
        res[f"fraction_of_kernel_rates_{mode}"] = kernel_bound_s(flops[mode], res["gemm_gflops"],
                                                                 res["trsm_gflops"]) / t
        log(f"  three decoders, {mode} ({mode_form(mode)}): fit {fit_total[mode]:.1f} s (+ factorise "
            f"{res['factorise_s']:.1f} s), of which {source_total[mode]:.1f} s generating the synthetic targets; "
            f"decoders {sizes[mode] / 2**30:.3f} GiB; {total / 1e12:.2f} TFLOP of arithmetic "
            f"({'dense' if mode == 'float16' else 'dense-equivalent'}; {flops[mode]['trsm'] / 1e12:.2f} of it in "
            f"triangular solves) = {100 * res[f'fraction_of_gemm_{mode}']:.0f}% of the higher GEMM rate "
            f"({'/'.join(f'{100 * x:.0f}%' for x in res[f'fraction_of_gemm_before_after_{mode}'])} of the rate before/"
            "after), "
            f"{100 * res[f'fraction_of_kernel_rates_{mode}']:.0f}% of the GEMM and trsm rates' bound "
            "(generation excluded)")
    if "bundle_lowrank_bytes" in res:
        log(f"  low-rank bundle written: {res['bundle_lowrank_bytes'] / 2**30:.3f} GiB")
    log(f"  peak RSS {res['peak_rss_gb']:.2f} GB")
    if scale == 1.0:  # the targets are stated for the full shape only
        for mode in args.modes:
            t = res[f"fit_three_{mode}_plus_factorise_s"] - res[f"target_source_{mode}_s"]
            log(f"  target fit <= 600 s ({mode}, synthetic-target generation excluded): "
                f"{'met' if t <= 600 else 'MISSED'} ({t:.0f} s); "
                f">= 80% of GEMM: {'met' if res[f'fraction_of_gemm_{mode}'] >= 0.8 else 'MISSED'}; "
                f">= 80% of the kernels' bound: "
                f"{'met' if res[f'fraction_of_kernel_rates_{mode}'] >= 0.8 else 'MISSED'}")
        log(f"  target peak RSS <= 16 GB: {'met' if res['peak_rss_gb'] <= 16 else 'MISSED'}")
        if "lowrank" in args.modes:
            worst = min(fr["lowrank"]["r_overall"] for fr in res["features"].values())
            ok = res["bundle_lowrank_bytes"] <= 2 * 2**30 and worst >= 0.999
            log(f"  target bundle <= 2 GiB at r >= 0.999: {'met' if ok else 'MISSED'} (worst r {worst:.5f})")
    return res


def gemm_gflops(backend: str = "torch", size: int = 4096) -> float:
    """float32 GEMM rate of this machine (torch, the current thread count), best of 3, in GFLOP/s. Into a
    preallocated output, as the fit's kernels write (a fresh output's page faults would lower the reference)."""
    dev = "cuda" if backend == "torch_cuda" else "cpu"
    a = torch.randn(size, size, device=dev)
    b = torch.randn(size, size, device=dev)
    out = torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def resolve_form(form: str, n: int, p: int) -> str:
    """fit_ridge's ``form`` as it will be taken ("auto": dual when n < p)."""
    return ("dual" if n < p else "primal") if form == "auto" else form


def fit_flops(n: int, p: int, targets: dict, m: int, method: str, form: str = "primal") -> dict[str, float]:
    """The arithmetic a fit needs, split by kernel: ``{"gemm": ..., "trsm": ...}`` (flops).

    Always K (2 n^2 p); "eigh" adds the eigendecomposition (counted as 4/3 n^3, its matrix-matrix share).
    primal: per alpha the Cholesky inverse (4/3 n^3, "kernel") and H (2 p n^2); per target W (2 p n).
    dual (whitened, alpha below the kernel's mean eigenvalue): per alpha the Cholesky factor (n^3 / 3),
    G = L^-1 Xc (trsm, n^2 p) and, for the leave-one-out rows, those m columns of L^-1 (trsm, n^2 m)
    ("kernel"); per target C = L^-1 Yc (trsm, n^2; "eigh": a GEMM, 2 n^2).
    dual_targets (alpha at or above it): per alpha the Cholesky factor, G = (K + alpha I)^-1 Xc (two trsm,
    2 n^2 p) and the leave-one-out rows of (K + alpha I)^-1 (two trsm, 2 n^2 m) ("kernel"; "eigh": GEMMs,
    2 n^2 p + 2 m n^2); nothing per target (C = Yc).
    All: the leave-one-out rows, 2 m n per target."""
    g = 2.0 * n * n * p + (0 if method == "kernel" else 4 / 3 * n ** 3 + 2.0 * p * n * n)
    tr = 0.0
    for T in targets.values():
        g += T * 2.0 * m * n
        if form == "primal":
            g += (4 / 3 * n ** 3 if method == "kernel" else 0) + 2.0 * p * n * n + T * 2.0 * p * n
        elif form == "dual_targets":
            if method == "kernel":
                g += n ** 3 / 3
                tr += 2.0 * n * n * p + 2.0 * float(n * n) * m
            else:
                g += 2.0 * n * n * p + 2.0 * m * float(n * n)
        elif method == "kernel":
            g += n ** 3 / 3
            tr += n * n * p + float(n * n) * m + T * float(n * n)
        else:
            g += T * 2.0 * n * n
    return {"gemm": g, "trsm": tr}


def trsm_gflops(backend: str = "torch", n: int = 4096, cols: int = 4096) -> float:
    """float32 triangular solve rate, ``L^-1 B`` with L (n, n) and B (n, cols) (n^2 cols flops), best of 3, in
    GFLOP/s, into a preallocated output as the fit solves its target batches; the fit's own shape is the
    meaningful one (at 4,096 x 4,096 these CPUs ran 221-236 GFLOP/s, at 8,859 x 4,096 about 330). L is any
    well-conditioned lower triangle: the rate does not depend on its values."""
    dev = "cuda" if backend == "torch_cuda" else "cpu"
    L = torch.tril(torch.randn(n, n, device=dev)) / n ** 0.5
    L.diagonal().add_(2.0)
    b = torch.randn(n, cols, device=dev)
    out = torch.linalg.solve_triangular(L, b, upper=False)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        torch.linalg.solve_triangular(L, b, upper=False, out=out)
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n * n * cols / best / 1e9


def widest_batch(batch: int, shapes: dict[str, tuple[int, ...]]) -> int:
    """Columns of the widest target batch the fits solve: ``--batch``, or the largest feature if narrower."""
    return min(int(batch), max(int(np.prod(s)) for s in shapes.values()))


def kernel_bound_s(flops: dict[str, float], gemm: float, trsm: float) -> float:
    """Seconds the arithmetic takes at the machine's measured GEMM and trsm rates (GFLOP/s)."""
    return flops["gemm"] / (gemm * 1e9) + flops["trsm"] / (trsm * 1e9)


def loo_setting(loo_rows: int | None, scale: float) -> bool | int:
    """--loo-rows: None -> 1,000 rows at full scale (times ``scale``, >= 50); 0 -> all rows."""
    if loo_rows == 0:
        return True
    return max(50, round(1000 * scale)) if loo_rows is None else int(loo_rows)


#: himalaya: KernelRidge (linear kernel, "eigenvalues") and Ridge ("svd") on its numpy backend, KernelRidge on its
#: torch backend (on one CPU thread its numpy backend was ~9x faster on these shapes); the fastest is its best
HIMALAYA = ("himalaya_kernel_numpy", "himalaya_ridge_svd_numpy", "himalaya_kernel_torch")
#: fit_ridge_kernel / _eigh take --form (default auto: dual when n < p); fit_ridge_kernel_primal is the primal
#: weights on the same factorisation, for the ratio between the two forms
PEERS = ("sklearn",) + HIMALAYA + ("fit_ridge_kernel", "fit_ridge_eigh", "fit_ridge_kernel_primal")


def run_one(args) -> int:
    """Child process: one peer on the comparison data; writes its predictions and figures under --npy."""
    scale = min(args.scale, args.compare_scale)
    syn = Synthetic(scale, seed=1)
    shapes = feature_layout(scale)
    Ys = {name: syn.targets(name, int(np.prod(s)), slice(0, syn.n))(0, int(np.prod(s))) for name, s in shapes.items()}
    base = peak_rss_gb()
    peer, out = args.one, Path(args.npy)
    preds = {}
    t0 = time.perf_counter()
    if peer == "sklearn":  # as the original scripts: float64, VDVAE in one fit, CLIP one fit per token
        from sklearn.linear_model import Ridge

        X64, Xt64 = syn.X.astype(np.float64), syn.X_test.astype(np.float64)
        for name, shp in shapes.items():
            Y64, alpha = Ys[name].astype(np.float64), PAPER.ridge_alpha(name)
            if name == "vdvae":
                preds[name] = Ridge(alpha=alpha, fit_intercept=True).fit(X64, Y64).predict(Xt64)
            else:
                d = shp[1]
                preds[name] = np.concatenate(
                    [Ridge(alpha=alpha, fit_intercept=True).fit(X64, Y64[:, i * d:(i + 1) * d]).predict(Xt64)
                     for i in range(shp[0])], axis=1)
    elif peer.startswith("himalaya"):
        from himalaya.backend import set_backend
        from himalaya.kernel_ridge import KernelRidge
        from himalaya.ridge import Ridge as HRidge

        torch_backend = "torch_cuda" if args.backend == "torch_cuda" else "torch"
        backend = set_backend(torch_backend if peer.endswith("torch") else "numpy", on_error="raise")
        X32, Xt32 = syn.X.astype(np.float32), syn.X_test.astype(np.float32)  # float32, as fit_ridge computes
        for name in shapes:
            alpha = PAPER.ridge_alpha(name)
            # (Ridge "svd" warns that kernel ridge is faster when n < p: both are timed; the faster is its best)
            model = (HRidge(alpha=alpha, fit_intercept=True, solver="svd", solver_params={"warn": False})
                     if "ridge_svd" in peer else
                     KernelRidge(alpha=alpha, kernel="linear", solver="eigenvalues", fit_intercept=True))
            model.fit(X32, Ys[name])
            preds[name] = np.asarray(backend.to_numpy(model.predict(Xt32)))
    else:
        method, _, primal = peer.removeprefix("fit_ridge_").partition("_")
        fact = factorise(syn.X, backend=args.backend, method=method)
        loo = loo_setting(args.loo_rows, scale)
        for name in shapes:
            dec = fit_ridge(fact, Ys[name], PAPER.ridge_alpha(name), n_targets_batch=args.batch, dtype="float32",
                            loo_stats=loo, form="primal" if primal else args.form)
            preds[name] = dec.predict(syn.X_test)  # plain ridge: no rescaling
    seconds = time.perf_counter() - t0
    for name, v in preds.items():
        np.save(out / f"{peer}_{name}.npy", np.asarray(v, dtype=np.float64))
    (out / f"{peer}.json").write_text(json.dumps({"s": seconds, "peak_rss_gb": peak_rss_gb(), "data_rss_gb": base}))
    return 0


def run_compare(args, log) -> dict:
    import subprocess

    scale = min(args.scale, args.compare_scale)
    syn = Synthetic(scale, seed=1)
    shapes = feature_layout(scale)
    targets = {k: int(np.prod(v)) for k, v in shapes.items()}
    loo = loo_setting(args.loo_rows, scale)
    m_rows = syn.n if loo is True else min(int(loo), syn.n)
    log(f"[peers x{scale}] X {syn.n} x {syn.p}; targets " + ", ".join(f"{k} {v}" for k, v in targets.items()) +
        f"; {torch.get_num_threads()} thread(s); fit_ridge LOO rows {m_rows}")
    gemm = gemm_gflops(args.backend)
    log(f"  float32 GEMM (4096^3): {gemm:.1f} GFLOP/s")
    res: dict = {"scale": scale, "n": syn.n, "p": syn.p, "targets": targets, "gemm_gflops": gemm, "peers": {}}
    with tempfile.TemporaryDirectory(prefix="ridge_peers_") as tmp:
        for peer in PEERS:
            cmd = [sys.executable, __file__, "--one", peer, "--npy", tmp, "--scale", str(args.scale),
                   "--compare-scale", str(args.compare_scale), "--threads", str(args.threads),
                   "--backend", args.backend, "--batch", str(args.batch), "--form", args.form]
            if args.loo_rows is not None:
                cmd += ["--loo-rows", str(args.loo_rows)]
            subprocess.run(cmd, check=True)
            res["peers"][peer] = json.loads((Path(tmp) / f"{peer}.json").read_text())
        ref = {name: np.load(Path(tmp) / f"sklearn_{name}.npy") for name in shapes}
        for peer in PEERS:
            err = max(float(np.abs(np.load(Path(tmp) / f"{peer}_{name}.npy") - ref[name]).max() / ref[name].std())
                      for name in shapes)
            res["peers"][peer]["max_rel_diff"] = err
    form = resolve_form(args.form, syn.n, syn.p)
    Xc = syn.X - syn.X.mean(0)
    mean_eig = float(np.einsum("ij,ij->", Xc, Xc)) / syn.n  # trace(K) / n, what fit_ridge's dual_form compares
    del Xc
    split = fit_flops(syn.n, syn.p, {}, m_rows, "kernel", form)
    for name, T in targets.items():
        f = "dual_targets" if form == "dual" and PAPER.ridge_alpha(name) >= mean_eig else form
        one, base = (fit_flops(syn.n, syn.p, t, m_rows, "kernel", f) for t in ({name: T}, {}))
        split = {k: split[k] + one[k] - base[k] for k in split}
    flops = sum(split.values())
    trsm = trsm_gflops(args.backend, syn.n, widest_batch(args.batch, shapes))
    ours = res["peers"]["fit_ridge_kernel"]["s"]
    hima = min(HIMALAYA, key=lambda k: res["peers"][k]["s"])
    log(f"  {'peer':30s} {'s':>8s} {'peak RSS GB':>12s} {'(data)':>7s} {'max |diff|/std':>15s} "
        f"{'fit_ridge faster':>17s}")
    for peer, r in res["peers"].items():
        log(f"  {peer:30s} {r['s']:8.2f} {r['peak_rss_gb']:12.2f} {r['data_rss_gb']:7.2f} {r['max_rel_diff']:15.1e} "
            f"{r['s'] / ours:16.1f}x")
    res.update(best_himalaya=hima, vs_himalaya=res["peers"][hima]["s"] / ours,
               vs_sklearn=res["peers"]["sklearn"]["s"] / ours, fit_ridge_tflop=flops / 1e12, form=form,
               trsm_gflops=trsm, fraction_of_gemm=flops / ours / (gemm * 1e9),
               fraction_of_kernel_rates=kernel_bound_s(split, gemm, trsm) / ours,
               dual_vs_primal=res["peers"]["fit_ridge_kernel_primal"]["s"] / ours)
    log(f"  fit_ridge (kernel, {form}): {flops / 1e9:.1f} GFLOP of arithmetic in {ours:.2f} s = "
        f"{100 * res['fraction_of_gemm']:.0f}% of the GEMM rate ({100 * res['fraction_of_kernel_rates']:.0f}% of "
        f"the GEMM and trsm ({trsm:.0f} GFLOP/s) rates' bound); {res['vs_himalaya']:.1f}x himalaya's best "
        f"({hima}), {res['vs_sklearn']:.1f}x scikit-learn as the original used it, "
        f"{res['dual_vs_primal']:.2f}x its own primal weights")
    bad = {k: r["max_rel_diff"] for k, r in res["peers"].items() if r["max_rel_diff"] > 1e-3}
    assert not bad, f"predictions differ from scikit-learn: {bad}"
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="shrink n, p and target counts by this factor")
    ap.add_argument("--skip-full", action="store_true", help="only run the scikit-learn comparison")
    ap.add_argument("--skip-compare", action="store_true", help="only run the full-shape part")
    ap.add_argument("--compare-scale", type=float, default=0.1, help="size of the scikit-learn comparison (capped by --scale)")
    ap.add_argument("--modes", default="float16", help="storage modes to time: float16,lowrank (lowrank: --method eigh)")
    ap.add_argument("--method", default="kernel", choices=["kernel", "eigh"],
                    help="factorisation of the full-shape part (default kernel: the alphas are fixed)")
    ap.add_argument("--rank", type=int, default=1000, help="low-rank rank at full scale (scaled with --scale)")
    ap.add_argument("--loo-rows", type=int, default=None,
                    help="leave-one-out statistics from this many sampled training rows (default 1,000 x scale; 0: all)")
    ap.add_argument("--batch", type=int, default=4096, help="n_targets_batch")
    ap.add_argument("--form", default="auto", choices=["auto", "primal", "dual"],
                    help="fit_ridge's weights form (default auto: the dual form when n < p)")
    ap.add_argument("--backend", default="torch", choices=["numpy", "torch", "torch_cuda", "auto"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tmp-dir", default=None, help="where the low-rank bundle is written to be measured")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--one", default=None, choices=PEERS, help=argparse.SUPPRESS)  # child process of the comparison
    ap.add_argument("--npy", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in ("float16", "lowrank")]
    if bad:
        ap.error(f"--modes must be a comma list of float16,lowrank; {bad} was provided")
    if "lowrank" in args.modes and args.method != "eigh" and not args.skip_full:
        ap.error("--modes lowrank needs --method eigh (the low-rank factors come from the eigendecomposition)")
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)  # numpy/scipy BLAS (scikit-learn) gets the same thread count as torch

    if args.one:
        return run_one(args)

    def log(msg: str) -> None:
        print(msg, flush=True)

    out: dict = {"argv": sys.argv[1:]}
    if not args.skip_full:
        out["full"] = run_full(args, log)
    if not args.skip_compare:
        out["compare"] = run_compare(args, log)
    out["peak_rss_gb"] = peak_rss_gb()
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
