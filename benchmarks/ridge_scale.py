"""Ridge decoders at one NSD subject's full shape, on synthetic data; and the ratio against scikit-learn.

Usage::

    python benchmarks/ridge_scale.py                       # full shape (about an hour on 2 cores) + comparison
    python benchmarks/ridge_scale.py --scale 0.1 --out r.json   # everything shrunk 10x in n, p and targets
    python benchmarks/ridge_scale.py --skip-full           # only the scikit-learn comparison
    python benchmarks/ridge_scale.py --modes lowrank       # full shape, low-rank bundle only (half the time)

Parts
-----
1. Full shape (times ``--scale``): X (8,859 x 15,724) and the three decoders' targets, VDVAE 91,168,
   CLIP-text 77 x 768 = 59,136, CLIP-vision 257 x 768 = 197,376, with the paper's alphas. One
   factorisation serves the three fits. Two storage modes are timed (``--modes``): ``float16`` (exact
   weights, float16, what ``fit`` writes by default) and ``lowrank`` (rank ``--rank``, float16 factors).
   Printed: wall time and peak RSS per step, bundle size per subject for both modes (float16: from the
   decoders' bytes; low rank: a bundle really written and measured), and the correlation of the low-rank (and
   float16) test predictions with the exact float32 solution ``(X_test - mean) Xc^T (K + alpha I)^-1 Yc``.
   Targets: fit of the three decoders <= 30 min and <= 16 GB on 2 cores; bundle <= 2 GB at r >= 0.999.
2. Comparison (size ``min(--scale, --compare-scale)``, default 0.1, where scikit-learn already takes about
   3 minutes): scikit-learn ``Ridge(alpha, fit_intercept=True)`` as the original scripts used it (float64
   X and Y, solver "auto"; VDVAE in one fit; CLIP one fit per token, 77 and 257 fits of 768 columns each)
   against this project's ``fit_ridge`` (one factorisation, all targets, float32 weights, leave-one-out
   statistics included). Asserts equal predictions (max abs
   difference <= 1e-3 x the predictions' std) and prints the speed ratio (target >= 5x).

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
    proj = (fact.XtU * (1.0 / (fact.lam + alpha))) @ fact.U.T  # (p, n)
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
    t0 = time.perf_counter()
    fact = factorise(syn.X, backend=args.backend)
    res["factorise_s"] = time.perf_counter() - t0
    log(f"  factorise: {res['factorise_s']:.1f} s, peak RSS {peak_rss_gb():.2f} GB")
    rank = max(1, min(syn.n, round(args.rank * scale)))
    res["rank"] = rank
    loo = True if args.loo_rows is None else args.loo_rows
    fit_total = {m: 0.0 for m in args.modes}
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
            yb = _gen(start, stop)
            if not _f[start:stop].all():  # exact float32 test predictions, on the fly, once per column
                mu = yb.mean(0)
                _ex[:, start:stop] = (_T @ torch.from_numpy(yb - mu)).numpy() + mu
                _f[start:stop] = True
            return yb

        fr: dict = {"n_targets": T, "alpha": alpha}
        for mode in args.modes:
            t0 = time.perf_counter()
            dec = fit_ridge(fact, Y, alpha, n_targets=T, n_targets_batch=args.batch, loo_stats=loo,
                            rank=rank if mode == "lowrank" else None, dtype="float16")
            dt = time.perf_counter() - t0
            fit_total[mode] += dt
            pred = dec.predict(syn.X_test, rescale="none")
            fr[mode] = {"fit_s": dt, "bytes": dec.nbytes, **_corr_stats(pred, exact)}
            sizes[mode] += dec.nbytes
            log(f"  {name:11s} {mode:8s} fit {dt:7.1f} s  {dec.nbytes / 2**30:6.3f} GiB  "
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
    for mode in args.modes:
        log(f"  three decoders, {mode}: fit {fit_total[mode]:.1f} s (+ factorise {res['factorise_s']:.1f} s), "
            f"decoders {sizes[mode] / 2**30:.3f} GiB")
    if "bundle_lowrank_bytes" in res:
        log(f"  low-rank bundle written: {res['bundle_lowrank_bytes'] / 2**30:.3f} GiB")
    log(f"  peak RSS {res['peak_rss_gb']:.2f} GB")
    if scale == 1.0:  # the targets are stated for the full shape only
        for mode in args.modes:
            t = res[f"fit_three_{mode}_plus_factorise_s"]
            log(f"  target fit <= 1800 s ({mode}): {'met' if t <= 1800 else 'MISSED'} ({t:.0f} s)")
        log(f"  target peak RSS <= 16 GB: {'met' if res['peak_rss_gb'] <= 16 else 'MISSED'}")
        if "lowrank" in args.modes:
            worst = min(fr["lowrank"]["r_overall"] for fr in res["features"].values())
            ok = res["bundle_lowrank_bytes"] <= 2 * 2**30 and worst >= 0.999
            log(f"  target bundle <= 2 GiB at r >= 0.999: {'met' if ok else 'MISSED'} (worst r {worst:.5f})")
    return res


def run_compare(args, log) -> dict:
    from sklearn.linear_model import Ridge

    scale = min(args.scale, args.compare_scale)
    syn = Synthetic(scale, seed=1)
    shapes = feature_layout(scale)
    X64, Xt64 = syn.X.astype(np.float64), syn.X_test.astype(np.float64)
    Ys = {name: syn.targets(name, int(np.prod(s)), slice(0, syn.n))(0, int(np.prod(s))) for name, s in shapes.items()}
    log(f"[compare x{scale}] X {syn.n} x {syn.p}; targets " + ", ".join(f"{k} {v.shape[1]}" for k, v in Ys.items()))

    # scikit-learn as the original scripts: float64, VDVAE in one fit, CLIP one fit per token
    t0 = time.perf_counter()
    ref = {}
    for name, shp in shapes.items():
        Y64 = Ys[name].astype(np.float64)
        alpha = PAPER.ridge_alpha(name)
        if name == "vdvae":
            ref[name] = Ridge(alpha=alpha, fit_intercept=True).fit(X64, Y64).predict(Xt64)
        else:
            d = shp[1]
            ref[name] = np.concatenate(
                [Ridge(alpha=alpha, fit_intercept=True).fit(X64, Y64[:, i * d:(i + 1) * d]).predict(Xt64)
                 for i in range(shp[0])], axis=1)
    t_sk = time.perf_counter() - t0
    log(f"  scikit-learn Ridge (float64, per-token for CLIP): {t_sk:.2f} s")

    t0 = time.perf_counter()
    fact = factorise(syn.X, backend=args.backend)
    ours = {}
    for name in shapes:
        dec = fit_ridge(fact, Ys[name], PAPER.ridge_alpha(name), n_targets_batch=args.batch, dtype="float32")
        ours[name] = dec.predict(syn.X_test, rescale="none")
    t_ours = time.perf_counter() - t0
    log(f"  fit_ridge (float32, one factorisation, LOO stats): {t_ours:.2f} s  -> {t_sk / t_ours:.1f}x faster")
    err = {}
    for name in shapes:
        err[name] = float(np.abs(ours[name] - ref[name]).max() / ref[name].std())
        log(f"  {name:11s} max |ours - sklearn| / std(sklearn) = {err[name]:.2e}")
    assert all(e <= 1e-3 for e in err.values()), f"predictions differ from scikit-learn: {err}"
    return {"scale": scale, "n": syn.n, "p": syn.p, "sklearn_s": t_sk, "ours_s": t_ours,
            "speedup": t_sk / t_ours, "max_rel_err": err}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="shrink n, p and target counts by this factor")
    ap.add_argument("--skip-full", action="store_true", help="only run the scikit-learn comparison")
    ap.add_argument("--skip-compare", action="store_true", help="only run the full-shape part")
    ap.add_argument("--compare-scale", type=float, default=0.1, help="size of the scikit-learn comparison (capped by --scale)")
    ap.add_argument("--modes", default="float16,lowrank", help="storage modes to time: float16,lowrank")
    ap.add_argument("--rank", type=int, default=1000, help="low-rank rank at full scale (scaled with --scale)")
    ap.add_argument("--loo-rows", type=int, default=None, help="estimate LOO statistics on this many rows (default all)")
    ap.add_argument("--batch", type=int, default=4096, help="n_targets_batch")
    ap.add_argument("--backend", default="torch", choices=["numpy", "torch", "torch_cuda", "auto"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tmp-dir", default=None, help="where the low-rank bundle is written to be measured")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in ("float16", "lowrank")]
    if bad:
        ap.error(f"--modes must be a comma list of float16,lowrank; {bad} was provided")
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)  # numpy/scipy BLAS (scikit-learn) gets the same thread count as torch

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
