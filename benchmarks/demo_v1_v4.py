"""V1 against hV4 on the demo: finer and higher-contrast (V1), more colourful (V4)? World, stage 1 and final.

For each subject (and the subject average) and each of V1 and V4, the three image sets of
``demo_eccentricity.roi_image_sets``: the world's ``--k`` top-driving training images (the reference any decoder
can at best recover), the ROI-optimal stage-1 images and the final scenes (``--seeds`` each). Printed per set:
mean high-frequency energy fraction (``world.measures.hf_energy_fraction``, power above the cutoff over all
non-DC power), RMS contrast (sd of grey levels, 0-255) and colourfulness (Hasler & Suesstrunk 2003), and
whether V1 > V4 (HF, contrast) and V4 > V1 (colourfulness).

    python benchmarks/demo_v1_v4.py [--subjects 1,2,5,7] [--seeds 8] [--k 64] [--cache-dir DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo_eccentricity import demo_arguments, load_demo, roi_image_sets  # noqa: E402  (sibling benchmark, same folder)


def main(argv=None) -> int:
    ap = demo_arguments(__doc__, "ROI")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.k < 1:
        ap.error("--seeds and --k must be >= 1")
    torch.set_num_threads(args.threads)
    from brain_diffuser_core.world.measures import colourfulness, hf_energy_fraction, rms_contrast

    diffuser, subs, groups = load_demo(args.cache_dir, args.subjects)
    measures = {"HF": hf_energy_fraction, "contrast": rms_contrast, "colour": colourfulness}
    print(f"{'subject':<8} {'images':<8}" + "".join(f" {m + ' V1':>11} {m + ' V4':>11}" for m in measures)
          + "   V1>V4 HF  V1>V4 contrast  V4>V1 colour")
    tally = {kind: [0, 0, 0] for kind in ("world", "stage 1", "final")}
    for label, members in groups:
        sets = {roi: roi_image_sets(diffuser, subs, members, roi, k=args.k, seeds=args.seeds,
                                    name=f"v1-v4/{roi}/{label}") for roi in ("V1", "V4")}
        for kind in tally:
            vals = {m: {roi: float(np.mean(f(sets[roi][kind]))) for roi in sets} for m, f in measures.items()}
            checks = [vals["HF"]["V1"] > vals["HF"]["V4"], vals["contrast"]["V1"] > vals["contrast"]["V4"],
                      vals["colour"]["V4"] > vals["colour"]["V1"]]
            for i, ok in enumerate(checks):
                tally[kind][i] += int(ok)
            print(f"{label:<8} {kind:<8}" + "".join(f" {vals[m]['V1']:11.3f} {vals[m]['V4']:11.3f}" for m in measures)
                  + "   " + "  ".join(f"{'yes' if ok else 'no':>8}" for ok in checks), flush=True)
    n = len(groups)
    for kind, (hf, contrast, colour) in tally.items():
        print(f"{kind:<8}: V1 finer {hf}/{n}, V1 higher-contrast {contrast}/{n}, V4 more colourful {colour}/{n} "
              "(subjects and the average)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
