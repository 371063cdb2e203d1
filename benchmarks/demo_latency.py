"""First-run costs of the demo and the latency of one demo reconstruction, on CPU.

Measures, in one run:

1. the MiniNSD world build (``ensure_world``, default parameters: what the app's first run does), against the
   baseline of the same call once the world is cached (the check the app makes on every later start);
2. the demo bundle (``ensure_demo_bundle``: feature extraction with the demo models + ridge fits for the 4
   subjects), against the cached call;
3. one demo reconstruction of a test trial, both stages at the paper's default settings (50 DDIM steps x
   strength 0.75 = 37 steps, guidance 7.5), against the baseline of stage 1 alone in the same run.

Targets (issue 4): reconstruction <= 2 s on 2 CPU cores; bundle <= ~2 min with the untrained tiny models.

    python benchmarks/demo_latency.py [--cache-dir DIR] [--models-dir DIR] [--threads 2] [--repeats 3]

Without ``--cache-dir`` everything is built in a fresh temporary folder (a true first run).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=None, help="cache folder (default: a fresh temporary one)")
    ap.add_argument("--models-dir", default=None, help="demo models (default: assets/demo/models)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the target machine)")
    ap.add_argument("--repeats", type=int, default=3, help="timed reconstructions (after one warm-up)")
    ap.add_argument("--subject", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from brain_diffuser_core.nsd import load_subject
    from brain_diffuser_core.pipeline import BrainDiffuser
    from brain_diffuser_core.world.build import ensure_world
    from brain_diffuser_core.world.demo import ensure_demo_bundle, read_demo_stamp

    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="demo-latency-")
        cache = Path(tmp.name)
    else:
        cache = Path(args.cache_dir)
    rows = []

    # 1. World
    root, t_world = _timed(lambda: ensure_world(cache))
    _, t_world_cached = _timed(lambda: ensure_world(cache))
    rows.append(("world build (ensure_world)", t_world, "cached check", t_world_cached))

    # 2. Demo bundle
    bundle, t_bundle = _timed(lambda: ensure_demo_bundle(cache, models_dir=args.models_dir))
    _, t_bundle_cached = _timed(lambda: ensure_demo_bundle(cache, models_dir=args.models_dir))
    rows.append(("demo bundle (ensure_demo_bundle)", t_bundle, "cached check", t_bundle_cached))
    stamp = read_demo_stamp(bundle)

    # 3. One reconstruction, both stages, default steps
    subj = load_subject(root, args.subject, cache_dir=cache / "nsd", progress=False)
    bd, t_load = _timed(lambda: BrainDiffuser(bundle, device="cpu"))
    fmri, ids = subj.test_fmri[:1], subj.test_image_ids[:1]
    bd.reconstruct(fmri, args.subject, image_ids=ids)  # warm-up
    totals, s1, s2, only1 = [], [], [], []
    for _ in range(args.repeats):
        (rec,), t = _timed(lambda: bd.reconstruct(fmri, args.subject, image_ids=ids))
        totals.append(t)
        s1.append(rec.timings["stage1"])
        s2.append(rec.timings["stage2"])
        _, t = _timed(lambda: bd.reconstruct(fmri, args.subject, image_ids=ids, run_stage2=False))
        only1.append(t)
    med = float(np.median(totals))
    rows.append(("reconstruction, both stages", med, "stage 1 only", float(np.median(only1))))

    # 4. Report
    print(f"torch threads {torch.get_num_threads()}; demo models trained: {stamp['models_trained']}; "
          f"cache {cache}")
    print(f"{'what':36s} {'seconds':>9s}   {'baseline':18s} {'seconds':>9s} {'ratio':>7s}")
    for what, t, base, tb in rows:
        print(f"{what:36s} {t:9.3f}   {base:18s} {tb:9.3f} {t / max(tb, 1e-9):7.1f}x")
    print(f"reconstruction detail (median of {args.repeats}): stage 1 {np.median(s1):.3f} s, stage 2 "
          f"{np.median(s2):.3f} s ({rec.settings.get('denoising_steps', 'default')} steps), model load {t_load:.2f} s; "
          f"target <= 2 s: {'met' if med <= 2.0 else 'NOT met'}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "threads": torch.get_num_threads(), "models_trained": stamp["models_trained"],
            "rows": [{"what": w, "seconds": t, "baseline": b, "baseline_seconds": tb} for w, t, b, tb in rows],
            "stage1_s": float(np.median(s1)), "stage2_s": float(np.median(s2)), "model_load_s": t_load}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
