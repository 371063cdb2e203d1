"""The MiniNSD world's noise ceiling, computed as NSD does (Allen et al. 2022): ncsnr = signal sd / noise sd per
voxel, noise ceiling NC = 100 * ncsnr^2 / (ncsnr^2 + 1/n) for the mean of n trials.

    python benchmarks/world_noise_ceiling.py [--subjects 1,2,5,7] [--images 600] [--noise-sd 3.0]

Signal sd: the sd over world scenes of the observer's noise-free responses; noise sd: the observer's trial
noise (noise_sd x sqrt((1 - rho) + rho * loading^2) per voxel). Printed per subject: median ncsnr and the
median NC for 1 and 3 trials, over all voxels and over voxels whose pRF lies on the image (visibility > 0.5).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="1,2,5,7")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--noise-sd", type=float, default=None, help="default: the default world's")
    args = ap.parse_args()
    from brain_diffuser_core.world import observer as obs_mod
    from brain_diffuser_core.world.build import DEFAULT_PARAMS
    from brain_diffuser_core.world.scenes import generate_scenes

    noise_sd = DEFAULT_PARAMS["noise_sd"] if args.noise_sd is None else args.noise_sd
    feats = obs_mod.scene_features(generate_scenes(args.images, seed=12345))
    print(f"noise_sd {noise_sd}, {args.images} scenes; NC = 100 ncsnr^2 / (ncsnr^2 + 1/n)")
    print(f"{'subject':>8s} {'voxels':>7s} {'ncsnr':>6s} {'NC 1':>6s} {'NC 3':>6s} | on-image: {'voxels':>6s} "
          f"{'ncsnr':>6s} {'NC 1':>6s} {'NC 3':>6s}")
    for s in [int(x) for x in args.subjects.split(",")]:
        ob = obs_mod.Observer(s, noise_sd=noise_sd)
        ncsnr = ob.ncsnr(feats).astype(np.float64)

        def nc(k, sel):
            return float(np.median(100 * ncsnr[sel] ** 2 / (ncsnr[sel] ** 2 + 1.0 / k)))

        on = ob.tuning.visibility > 0.5
        allv = np.ones_like(on)
        print(f"{s:>8d} {allv.sum():>7d} {np.median(ncsnr):6.3f} {nc(1, allv):5.1f}% {nc(3, allv):5.1f}% | "
              f"{'':10s}{on.sum():>6d} {np.median(ncsnr[on]):6.3f} {nc(1, on):5.1f}% {nc(3, on):5.1f}%")


if __name__ == "__main__":
    main()
