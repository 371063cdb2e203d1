"""``sweep``: ROI-optimal scenes for patterns x subjects (and their average) x seeds, into a browsable folder."""
from __future__ import annotations

import argparse

from ..config import PAPER
from ._engine import (ENGINE_HELP, add_engine_arguments, add_stage_arguments, run_batch, stage_overrides,
                      worker_threads)

HELP = "ROI-optimal scenes for many patterns, subjects and seeds (PNGs + index.csv), resumable, local or on Ray"

DESCRIPTION = f"""\
Make the paper's ROI-optimal scenes in bulk: each pattern (a catalogue ROI such as 'faces' or 'V1', a preset
such as 'V1-V4+places', or a pattern .json saved by the app's ROI designer) becomes a synthetic fMRI pattern
(weight inside the ROI, 0 elsewhere, not z-scored), is decoded per subject (or averaged over the bundle's
subjects for 'average'), and generated with --seeds seeds ({PAPER.stage2.num_inference_steps} DDIM steps at strength
{PAPER.stage2.strength} unless changed).

Writes <out>/images/<pattern>/<subject>/<k>_final.png and _stage1.png, <out>/index.csv and index.json (one
row per scene: pattern, subject, k, seed, active voxels, files), <out>/batch.json (the settings) and
<out>/shards/ (what is finished). The app's Browse page opens the folder ("Open a results folder").

{ENGINE_HELP}
examples:
  python -m brain_diffuser_core sweep --bundle B --nsd-root R --patterns faces,V1,my.json \\
      --subjects 1,average --seeds 16 --out sweeps/faces-v1
  python -m brain_diffuser_core sweep ... --engine ray                       # embedded Ray, one actor per CPU
  python -m brain_diffuser_core sweep ... --engine ray --ray-address auto    # a running cluster (SLURM)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sweep", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, metavar="DIR", help="decoder bundle folder (from `fit`)")
    p.add_argument("--nsd-root", required=True, metavar="DIR", help="NSD root folder (for the ROI masks)")
    p.add_argument("--patterns", required=True, metavar="LIST",
                   help="comma-separated ROIs, presets and pattern .json files, e.g. 'faces,V1,V1-V4+places,my.json'")
    p.add_argument("--subjects", default="all", metavar="LIST",
                   help="comma-separated subjects and/or 'average' (of the bundle's subjects); 'all' = each + average")
    p.add_argument("--seeds", type=int, default=4, metavar="N", help="scenes per pattern and subject (4)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumed when it holds this sweep)")
    p.add_argument("--seed", type=int, default=0, help="base seed (each scene's seed derives from it, the pattern, "
                                                       "the subject and k)")
    add_stage_arguments(p, "skip stage 2 (VDVAE scenes only)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="scenes per generation call within a shard (1; part of the settings: batched float math "
                        "may differ in the last bits)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="prepared-arrays cache (as for `prepare`)")
    add_engine_arguments(p, shard_size=4)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..batch.sweep import build_sweep_job

    overrides = stage_overrides(args)
    run_batch(lambda: build_sweep_job(
        args.bundle, args.nsd_root, args.patterns, args.subjects, args.seeds, base_seed=args.seed,
        run_stage2=not args.stage1_only, overrides=overrides, device=args.device, batch_size=args.batch_size,
        threads=worker_threads(args), cache_dir=args.cache_dir), args)
    return 0
