"""``world validate``: score ROI-optimal scenes against the MiniNSD observers' known tuning.

Plugged into ``world`` through :data:`brain_diffuser_core.cli.world.ACTIONS` as ``"validate":
add_validate_action``. Argument parsing only (the work is in :mod:`brain_diffuser_core.world.validate`);
importing this module does not import torch.
"""
from __future__ import annotations

import argparse

from ..config import PAPER
from ._engine import ENGINE_HELP, add_engine_arguments, run_batch, worker_threads

HELP = "score ROI-optimal scenes of a bundle against the world's known tuning (in-silico validation)"

DESCRIPTION = f"""\
Generate the paper's ROI-optimal scenes (pattern 1 inside an ROI, 0 elsewhere; each subject and the subject
average) with a decoder bundle fitted on a MiniNSD world, and score them against the observers' known tuning:

  faces, bodies, places, words   fraction of images judged to show the preferred category
                                 (independent judge, the default: ImageNet EfficientNet-Lite0 features + a
                                 logistic regression fitted on fresh world scenes, its held-out accuracy
                                 printed; observer judge: noise-free response of the category areas, calibrated on
                                 the world's train images; CLIP judge: nearest category centroid in the
                                 bundle CLIP's image space, when it loads)          aim >= 80% over >= 16 seeds
  decoder level                  per ROI and subject, before generating: the category whose centroid is
                                 nearest (cosine, mean-centred) to the pattern's decoded CLIP-text and
                                 CLIP-vision features (columns "dec text" / "dec vis", summary fields
                                 decoded_text_category / decoded_vision_category; n/a without the bundle's
                                 CLIP). A category ROI decoded to the wrong category points at the decoders;
                                 one decoded right but judged wrong points at the generator
  V1, V4                         high-spatial-frequency energy fraction and colourfulness   aim: V1 HF > V4 HF
  ecc0pt5 ... ecc4+              radial centre of mass of contrast energy (deg)   aim: moves outward by band

Writes <out>/report.json (summary, aims, per-seed values), per_seed.csv, summary.csv and
<out>/sheets/<roi>.png contact sheets (rows = subjects, columns = seeds), and prints the table. The aims
are computed from the numbers; with untrained demo models they say nothing about the method (flagged).
The scenes are generated on the batch layer into <out>/images/<roi>/<subject>/<k>_scored.png (one item per
roi, subject and seed): a rerun skips finished shards, and other generation settings into the same <out>
are refused; the judges (--judge, --calibration, --judge-scenes) only score, again on every run.

{ENGINE_HELP}
examples:
  python -m brain_diffuser_core world validate --bundle ~/.cache/brain-diffuser-explorer/demo-bundle
  python -m brain_diffuser_core world validate --bundle B --world ~/mininsd --seeds 4 --rois faces,V1,V4
  python -m brain_diffuser_core world validate --bundle B --engine ray --ray-address auto
"""


def add_validate_action(actions) -> argparse.ArgumentParser:
    """Add ``validate`` to the ``world`` action sub-parsers."""
    from ..world.validate import DEFAULT_ROIS, JUDGES

    p = actions.add_parser("validate", help=HELP, description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, metavar="DIR", help="decoder bundle fitted on the world")
    p.add_argument("--world", default=None, metavar="DIR",
                   help="the MiniNSD world (default: the world recorded in the bundle's demo.json)")
    p.add_argument("--seeds", type=int, default=16, metavar="N", help="images per ROI and subject (default: 16)")
    p.add_argument("--out", default="world-validation", metavar="DIR",
                   help="report folder (default: ./world-validation)")
    p.add_argument("--rois", default=",".join(DEFAULT_ROIS), metavar="LIST",
                   help="comma-separated catalogue ROIs (default: the paper's 8 and the 5 eccentricity bands)")
    p.add_argument("--subjects", default=None, metavar="LIST",
                   help="comma-separated subjects and/or 'average' (default: every bundle subject and average)")
    p.add_argument("--judge", default="independent", choices=JUDGES,
                   help="judge used for the category aims (default: independent, an ImageNet EfficientNet-Lite0 "
                        "probe that played no part in training; clip needs the bundle's CLIP)")
    p.add_argument("--judge-scenes", type=int, default=200, metavar="N",
                   help="fresh scenes per category that fit the independent judge (default: 200; cached)")
    p.add_argument("--calibration", type=int, default=600, metavar="N",
                   help="world train images that fit and calibrate the judges (default: 600)")
    p.add_argument("--steps", type=int, default=PAPER.stage2.num_inference_steps,
                   help=f"DDIM steps (default: {PAPER.stage2.num_inference_steps})")
    p.add_argument("--stage1-only", action="store_true", help="score the stage-1 images (skip stage 2)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B",
                   help="images generated at once (default: 16; keep --shard-size a multiple of it for the "
                        "single-process batches)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="prepared-subject cache (as for `prepare`)")
    add_engine_arguments(p, shard_size=16)
    p.set_defaults(func=run_validate)
    return p


def _parse_subjects(text: str | None):
    if text is None:
        return None
    out = []
    for t in (t.strip() for t in text.split(",")):
        if not t:
            continue
        if t == "average":
            out.append(t)
            continue
        try:
            out.append(int(t))
        except ValueError:
            raise ValueError(f"'--subjects' must be a comma-separated list of subject numbers and/or 'average' "
                             f"like '1,2,average'; {text!r} was provided") from None
    return out


def run_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..batch._worker import decoders_only
    from ..batch.validate import ValidateJob, validation_images
    from ..export import bundle_digest
    from ..world.demo import read_demo_stamp
    from ..world.validate import fit_judges, plan_validation, score_validation

    if args.seeds < 1:
        raise ValueError(f"'--seeds' must be >= 1; {args.seeds} was provided")
    world = args.world
    if world is None:
        stamp = read_demo_stamp(args.bundle)
        if stamp is None or not stamp.get("world_root"):
            raise ValueError(f"bundle {args.bundle} records no world (no demo.json with 'world_root'); "
                             "pass --world DIR")
        world = stamp["world_root"]
    if args.threads is None and args.engine == "local" and torch.get_num_threads() > 2 \
            and str(args.device) == "cpu":
        torch.set_num_threads(2)
    # the driver decodes and scores; the batch workers hold the generative models
    diffuser = decoders_only(args.bundle, args.device)
    rois = [r.strip() for r in args.rois.split(",") if r.strip()]
    plan = plan_validation(diffuser.bundle, world, rois=rois, subjects=_parse_subjects(args.subjects),
                           n_seeds=args.seeds, judge=args.judge, base_seed=args.seed, cache_dir=args.cache_dir)
    judges = fit_judges(diffuser, plan, judge=args.judge, n_calibration=args.calibration,
                        judge_scenes=args.judge_scenes, cache_dir=args.cache_dir)
    overrides = {"num_inference_steps": args.steps}
    run_stage2 = not args.stage1_only
    _, summary = run_batch(lambda: ValidateJob(
        bundle=str(Path(args.bundle).resolve()), bundle_digest=bundle_digest(args.bundle), plan=plan,
        run_stage2=run_stage2, overrides=overrides, device=str(args.device), batch_size=args.batch_size,
        threads=worker_threads(args)), args)
    if len(summary.rows) < summary.n_items:  # --part: another part still has shards to run
        print(f"{summary.n_items - len(summary.rows)} scene(s) still to generate (other --part ranges); the "
              "report is written by the run that finds every shard done")
        return 0
    report = score_validation(diffuser, plan, judges, validation_images(args.out, summary.rows), judge=args.judge,
                              run_stage2=run_stage2, **overrides)
    paths = report.write(args.out)
    print(report.format_table())
    print(f"\nreport         {paths['json']}")
    print(f"per seed       {paths['per_seed']}")
    print(f"contact sheets {Path(args.out) / 'sheets'} ({sum(k.startswith('sheet:') for k in paths)} PNGs)")
    return 0
