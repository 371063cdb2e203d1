"""``reconstruct``: PNGs of stage 1 and the final image beside the originals, for a subject's test trials."""
from __future__ import annotations

import argparse

from ..config import PAPER
from ._engine import (ENGINE_HELP, add_engine_arguments, add_mode_arguments, add_stage_arguments, run_batch,
                      stage_overrides, worker_threads)

HELP = "reconstruct test images of a subject with a decoder bundle (PNGs + manifest)"

DESCRIPTION = f"""\
Reconstruct a subject's test images (the shared 1000; repeats averaged) with a decoder bundle:
fMRI -> ridge -> VDVAE latents -> stage 1 (64 px, upscaled to 512) -> Versatile Diffusion img2img
({PAPER.stage2.denoising_steps} of {PAPER.stage2.num_inference_steps} DDIM steps, guidance {PAPER.stage2.guidance_scale}, \
vision/text mix {PAPER.stage2.vision_mix}/{PAPER.stage2.text_mix:.1f}) -> final.

Writes <out>/<73k id>_original.png, _stage1.png, _final.png and <out>/manifest.json (seeds, settings,
timings), index.csv/index.json (one row per trial). Each image's seed derives from its 73k id (and --seed),
so any one reproduces alone; finished shards in <out> are skipped, so an interrupted run resumes (other
settings into the same <out> are refused). The app's Browse page opens the folder ("Open a results folder").

{ENGINE_HELP}
example:
  python -m brain_diffuser_core reconstruct --bundle bundles/subj01 --nsd-root /data/nsd --subject 1 \\
      --trials 0-9 --out recon/subj01
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("reconstruct", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, metavar="DIR", help="decoder bundle folder (from `fit`)")
    p.add_argument("--nsd-root", required=True, metavar="DIR", help="NSD root folder (for fMRI and originals)")
    p.add_argument("--subject", required=True, type=int, choices=range(1, 9), metavar="N", help="subject 1..8")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--trials", default="0-9", metavar="LIST",
                   help="test-set rows (sorted by 73k id), e.g. '0-9', '3,17', or 'all' (default: 0-9)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="trials per generation batch (default 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed (per-image seeds derive from it and the 73k id)")
    add_mode_arguments(p)
    add_stage_arguments(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="prepared-arrays cache (as for `prepare`)")
    add_engine_arguments(p, shard_size=4)
    p.set_defaults(func=run)
    return p


def parse_rows(text: str, n: int) -> list[int]:
    """'all', '0-9', '3,17,20-22' -> sorted row indices, each checked against ``n`` rows."""
    if text.strip() == "all":
        return list(range(n))
    rows: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            rows.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"'--trials' must look like '0-9', '3,17' or 'all'; {text!r} was provided") from None
    bad = sorted(r for r in rows if not 0 <= r < n)
    if bad:
        raise ValueError(f"'--trials' rows must be in [0, {n}) (the subject's test images); {bad[:5]} were provided")
    return sorted(rows)


def run(args: argparse.Namespace) -> int:
    from ..batch.reconstruct import ReconstructJob, write_legacy_manifest

    from ..config import mode

    settings = stage_overrides(args)
    rescale = args.rescale or mode(args.paper).rescale

    def make_job() -> ReconstructJob:
        from pathlib import Path

        from ..bundle import load_bundle
        from ..export import bundle_digest
        from ..nsd import load_subject

        bundle = load_bundle(args.bundle)
        subject = load_subject(args.nsd_root, args.subject, cache_dir=args.cache_dir, progress=True)
        bundle.check_subject(args.subject, subject.n_voxels, subject.mask_sha256)
        rows = parse_rows(args.trials, len(subject.test_image_ids))
        return ReconstructJob(bundle=str(Path(args.bundle).resolve()), bundle_digest=bundle_digest(args.bundle),
                              nsd_root=str(Path(args.nsd_root).resolve()), subject=args.subject, rows=rows,
                              image_ids=[int(subject.test_image_ids[r]) for r in rows], base_seed=args.seed,
                              rescale=rescale, run_stage2=not args.stage1_only, overrides=settings,
                              paper=bool(args.paper),
                              device=args.device, batch_size=args.batch_size, threads=worker_threads(args),
                              cache_dir=args.cache_dir and str(Path(args.cache_dir).resolve()))

    job, summary = run_batch(make_job, args)
    write_legacy_manifest(args.out, job, summary.rows)
    print(f"wrote {len(summary.rows)} reconstructions to {args.out}")
    return 0
