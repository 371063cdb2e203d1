"""Does content move outward band by band? The eccentricity bands on the demo: world, stage 1, final.

For each subject (and the subject average) and each eccentricity band (``ecc0pt5`` .. ``ecc4+``), three
image sets are measured:

* **world**: the ``--k`` training images whose simulated response inside the band is largest
  (``patterns.top_driving_images``; for the average, ``--k`` / n subjects of each): where the world itself puts
  the contrast that drives the band, the reference any decoder can at best recover;
* **stage 1** and **final**: the band's ROI-optimal scenes (``BrainDiffuser.reconstruct_pattern``, ``--seeds``
  seeds each, seeded per pattern name and seed).

The measure is :func:`~brain_diffuser_core.world.measures.differential_contrast_centroids` (each band's radial
contrast-energy profile minus the least-squares multiple of the bands' mean profile; centre of mass of the
positive part, degrees in the world's 8.4 deg field), with the plain contrast centroid
(:func:`~brain_diffuser_core.world.measures.contrast_centroid_deg`, mean over images) beside it. "outward" counts
the band-to-band steps (of 4) where the value increases.

    python benchmarks/demo_eccentricity.py [--subjects 1,2,5,7] [--seeds 8] [--k 64] [--strength S] [--sheet ecc.png]

``--sheet`` writes, per band of the first subject, 6 world images | 4 stage-1 | 4 final scenes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def demo_arguments(description: str, unit: str) -> argparse.ArgumentParser:
    """The options every ROI benchmark of the demo shares: --subjects, --seeds, --k, --threads, --cache-dir."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="1,2,5,7", help="comma-separated demo subjects (the average is added)")
    ap.add_argument("--seeds", type=int, default=8, help=f"ROI-optimal scenes per {unit}")
    ap.add_argument("--k", type=int, default=64, help=f"top-driving training images per {unit}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    return ap


def load_demo(cache_dir: str | None, subjects_csv: str):
    """The cached demo (built first if missing): (BrainDiffuser, {subject: Subject}, groups), where groups are
    ("subjNN", [subject]) per subject plus ("average", subjects) when there are several."""
    from brain_diffuser_core.config import cache_root
    from brain_diffuser_core.nsd import load_subject
    from brain_diffuser_core.pipeline import BrainDiffuser
    from brain_diffuser_core.world.build import ensure_world
    from brain_diffuser_core.world.demo import ensure_demo_bundle

    cache = cache_root() if cache_dir is None else cache_dir
    bundle = ensure_demo_bundle(cache)
    world = ensure_world(cache)
    subjects = [int(s) for s in subjects_csv.split(",")]
    subs = {s: load_subject(world, s, cache_dir=f"{cache}/nsd", progress=False) for s in subjects}
    groups = [(f"subj{s:02d}", [s]) for s in subjects] + ([("average", subjects)] if len(subjects) > 1 else [])
    return BrainDiffuser(bundle, device="cpu"), subs, groups


def roi_image_sets(diffuser, subs: dict, members: list[int], roi: str, *, k: int, seeds: int, name: str,
                   overrides: dict | None = None) -> dict[str, np.ndarray]:
    """The three image sets of one ROI: {"world", "stage 1", "final"} -> uint8 (n, 64, 64, 3) at the world's size.

    world: the ``k`` training images whose simulated response inside the ROI is largest (``k`` / len(members)
    of each member subject); stage 1 and final: the ROI's ``seeds`` ROI-optimal scenes for the members (the
    subject average when several), seeded by ``name``.
    """
    from brain_diffuser_core.patterns import top_driving_images
    from brain_diffuser_core.world.measures import to_world_size

    patterns = {s: subs[s].synthetic_pattern({roi: 1.0}) for s in members}
    world_images = []
    for s in members:
        ids, _ = top_driving_images(subs[s].train_fmri, subs[s].train_image_ids, patterns[s],
                                    k=max(1, k // len(members)))
        world_images += [subs[s].image(int(i)) for i in ids]
    recs = diffuser.reconstruct_pattern(patterns, name=name, n_seeds=seeds, **(overrides or {}))
    return {"world": to_world_size(np.stack(world_images)),
            "stage 1": to_world_size(np.stack([r.stage1_upscaled for r in recs])),
            "final": to_world_size(np.stack([r.final for r in recs]))}


def main(argv=None) -> int:
    ap = demo_arguments(__doc__, "band")
    ap.add_argument("--sheet", default=None, metavar="PNG")
    ap.add_argument("--strength", type=float, default=None,
                    help="stage-2 img2img strength (default: the paper's 0.75); lower keeps more of stage 1")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.k < 1:
        ap.error("--seeds and --k must be >= 1")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        ap.error(f"--strength must be in (0, 1]; {args.strength} was provided")
    overrides = {} if args.strength is None else {"strength": args.strength}
    torch.set_num_threads(args.threads)
    from brain_diffuser_core.world.measures import contrast_centroid_deg, differential_contrast_centroids
    from brain_diffuser_core.world.validate import ECCENTRICITY_ROIS

    diffuser, subs, groups = load_demo(args.cache_dir, args.subjects)
    bands = list(ECCENTRICITY_ROIS)

    print(f"{'subject':<8} {'images':<7} measure      " + " ".join(f"{b:>7}" for b in bands) + "  outward")
    sheet_rows = []
    for label, members in groups:
        sets = {"world": {}, "stage 1": {}, "final": {}}
        for band in bands:
            got = roi_image_sets(diffuser, subs, members, band, k=args.k, seeds=args.seeds,
                                 name=f"eccentricity/{band}/{label}", overrides=overrides)
            for kind, images in got.items():
                sets[kind][band] = images
            if args.sheet and label == groups[0][0]:
                gap = np.full((sets["world"][band].shape[1], 8, 3), 255, np.uint8)
                sheet_rows.append(np.concatenate(list(sets["world"][band][:6]) + [gap]
                                                 + list(sets["stage 1"][band][:4]) + [gap]
                                                 + list(sets["final"][band][:4]), axis=1))
        for kind, by_band in sets.items():
            diff = differential_contrast_centroids(by_band)
            plain = {b: float(np.nanmean(contrast_centroid_deg(v))) for b, v in by_band.items()}
            for name, vals in (("differential", diff), ("plain", plain)):
                v = [vals[b] for b in bands]
                steps = sum(bool(b > a) for a, b in zip(v, v[1:]))
                print(f"{label:<8} {kind:<7} {name:<12} " + " ".join(f"{x:7.2f}" for x in v) + f"  {steps}/4",
                      flush=True)
    if args.sheet:
        from PIL import Image

        Image.fromarray(np.concatenate(sheet_rows, axis=0)).save(args.sheet)
        print(f"sheet: {args.sheet} (rows {', '.join(bands)}: world | stage 1 | final)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
