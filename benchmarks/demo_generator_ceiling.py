"""How far the demo's generator and its CLIP judge can go: the paper's metrics for reconstructions made from
the TRUE features of the test images (the ceiling: perfect decoders), beside those from the features the
bundle's ridge decoders predict from the (simulated) fMRI of the same images, in one run.

    python benchmarks/demo_generator_ceiling.py [--subject 1] [--n 120] [--threads 1] [--cache-dir DIR]

Uses the cached demo (``ensure_demo_bundle``: the MiniNSD world, the demo models, their extracted features).
If the CLIP 2-way identification of the TRUE-feature images is near an aim, the aim is at the judge's and the
generator's ceiling; the gap between the two rows is what decoding from fMRI loses.
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subject", type=int, default=1)
    ap.add_argument("--n", type=int, default=120, help="test images (default: all 120 of the default world)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from brain_diffuser_core.config import FEATURE_NAMES, cache_root
    from brain_diffuser_core.features.store import FeatureStore
    from brain_diffuser_core.metrics import evaluate_images
    from brain_diffuser_core.nsd import load_subject
    from brain_diffuser_core.pipeline import BrainDiffuser
    from brain_diffuser_core.seeding import seed_for
    from brain_diffuser_core.world.demo import ensure_demo_bundle

    cache = cache_root() if args.cache_dir is None else args.cache_dir
    bundle = ensure_demo_bundle(cache)
    diffuser = BrainDiffuser(bundle, device="cpu")
    from brain_diffuser_core.world.build import WORLD_FORMAT_VERSION

    subject = load_subject(f"{cache}/mininsd-v{WORLD_FORMAT_VERSION}", args.subject, cache_dir=f"{cache}/nsd", progress=False)
    n = min(args.n, len(subject.test_image_ids))
    ids = [int(i) for i in subject.test_image_ids[:n]]
    stores = glob.glob(f"{cache}/demo-features/*")
    if len(stores) != 1:
        raise SystemExit(f"expected one feature store under {cache}/demo-features; found {stores}")
    store = FeatureStore(stores[0])
    true_feats = {f: store.get(f, ids).reshape((n,) + diffuser.bundle.feature_shape(f)) for f in FEATURE_NAMES}
    decoded = diffuser.predict_features(subject.test_fmri[:n], args.subject)
    truths = np.stack([subject.image(i) for i in ids])
    kwargs = {"clip": {"path": diffuser.bundle.clip_location(), "device": "cpu"}}
    seeds = [seed_for("trial", i) for i in ids]

    rows = {}
    for label, feats in (("decoded from fMRI (baseline)", decoded), ("TRUE features (ceiling)", true_feats)):
        t0 = time.perf_counter()
        recs = []
        for s in range(0, n, 8):
            recs += diffuser.generate({k: v[s:s + 8] for k, v in feats.items()}, keys=[str(i) for i in ids[s:s + 8]],
                                      seeds=seeds[s:s + 8])
        for variant, images in (("full", [r.final for r in recs]), ("stage1", [r.stage1_upscaled for r in recs])):
            summary, _ = evaluate_images(np.stack(images), truths, ["clip"], network_kwargs=kwargs,
                                         size=truths.shape[1])
            rows[f"{label}, {variant}"] = summary
        print(f"{label}: {n} images in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\nsubject {args.subject}, {n} test images; CLIP = 2-way identification with the demo's own CLIP")
    print(f"{'features, variant':45s} {'PixCorr':>8s} {'SSIM':>8s} {'CLIP':>8s}")
    for label, s in rows.items():
        print(f"{label:45s} {s['PixCorr']:8.3f} {s['SSIM']:8.3f} {100 * s['CLIP']:7.1f}%")
    base, ceil = rows["decoded from fMRI (baseline), full"]["CLIP"], rows["TRUE features (ceiling), full"]["CLIP"]
    print(f"full pipeline CLIP 2-way: decoded {100 * base:.1f}% / ceiling {100 * ceil:.1f}% = {base / ceil:.2f} of "
          "the ceiling")


if __name__ == "__main__":
    main()
