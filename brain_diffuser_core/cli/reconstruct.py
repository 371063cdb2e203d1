"""``reconstruct``: PNGs of stage 1 and the final image beside the originals, for a subject's test trials."""
from __future__ import annotations

import argparse

from ..config import PAPER

HELP = "reconstruct test images of a subject with a decoder bundle (PNGs + manifest)"

DESCRIPTION = f"""\
Reconstruct a subject's test images (the shared 1000; repeats averaged) with a decoder bundle:
fMRI -> ridge -> VDVAE latents -> stage 1 (64 px, upscaled to 512) -> Versatile Diffusion img2img
({PAPER.stage2.denoising_steps} of {PAPER.stage2.num_inference_steps} DDIM steps, guidance {PAPER.stage2.guidance_scale}, \
vision/text mix {PAPER.stage2.vision_mix}/{PAPER.stage2.text_mix:.1f}) -> final.

Writes <out>/<73k id>_original.png, _stage1.png, _final.png and <out>/manifest.json (seeds, settings,
timings). Each image's seed derives from its 73k id (and --seed), so any one reproduces alone; images already
in <out> with the same settings are skipped, so an interrupted run resumes.

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
    p.add_argument("--rescale", default=None, choices=("train", "paper", "none"),
                   help="prediction rescaling: train = leave-one-out train statistics (default; no test peeking); "
                        "paper = z-score across the whole test set as the original (default with --paper); none")
    p.add_argument("--paper", action="store_true",
                   help="reproduce the original scripts step for step (test-set z-score, start noise t=741, grey "
                        "127, truncated final images; README 'Where this differs'); default: the improvements")
    p.add_argument("--steps", type=int, default=PAPER.stage2.num_inference_steps, help="DDIM steps (50)")
    p.add_argument("--strength", type=float, default=PAPER.stage2.strength, help="img2img strength (0.75)")
    p.add_argument("--guidance", type=float, default=PAPER.stage2.guidance_scale, help="CFG scale (7.5)")
    p.add_argument("--vision-mix", type=float, default=PAPER.stage2.vision_mix, help="vision share of the mix (0.6)")
    p.add_argument("--stage1-only", action="store_true", help="skip stage 2")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="prepared-arrays cache (as for `prepare`)")
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
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from ..io import atomic_path, atomic_write_json
    from ..nsd import load_subject
    from ..pipeline import BrainDiffuser

    diffuser = BrainDiffuser(args.bundle, device=args.device, paper=args.paper)
    args.rescale = args.rescale or diffuser.mode.rescale
    subject = load_subject(args.nsd_root, args.subject, cache_dir=args.cache_dir, progress=True)
    diffuser.bundle.check_subject(args.subject, subject.n_voxels, subject.mask_sha256)
    rows = parse_rows(args.trials, len(subject.test_image_ids))
    settings = dict(num_inference_steps=args.steps, strength=args.strength, guidance_scale=args.guidance,
                    vision_mix=args.vision_mix)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    run_key = {"bundle": str(Path(args.bundle).resolve()), "subject": args.subject, "seed": args.seed,
               "rescale": args.rescale, "stage1_only": args.stage1_only, "mode": diffuser.mode.name, **settings}
    if manifest.get("run") != run_key:
        manifest = {"run": run_key, "images": {}}
    # "paper" rescaling z-scores across the predicted batch: it needs the whole test set at once
    all_features = (diffuser.predict_features(subject.test_fmri, args.subject, rescale="paper")
                    if args.rescale == "paper" else None)
    todo = [r for r in rows if str(int(subject.test_image_ids[r])) not in manifest["images"]]
    print(f"subject {args.subject}: {len(rows)} trials asked, {len(todo)} to run on {diffuser.device}")
    for start in tqdm(range(0, len(todo), args.batch_size), desc="reconstruct", unit="batch"):
        batch = todo[start:start + args.batch_size]
        ids = [int(subject.test_image_ids[r]) for r in batch]
        if all_features is None:
            recs = diffuser.reconstruct(subject.test_fmri[batch], args.subject, image_ids=ids, base_seed=args.seed,
                                        rescale=args.rescale, run_stage2=not args.stage1_only, **settings)
        else:
            from ..seeding import seed_for

            feats = {k: v[batch] for k, v in all_features.items()}
            recs = diffuser.generate(feats, keys=[f"subj{args.subject:02d}/nsd{i}" for i in ids],
                                     seeds=[seed_for("trial", i, base_seed=args.seed) for i in ids],
                                     run_stage2=not args.stage1_only, **settings)
        for image_id, rec in zip(ids, recs):
            files = {"original": subject.image(image_id), "stage1": rec.stage1_upscaled, "final": rec.final}
            for kind, img in files.items():
                if img is not None:
                    with atomic_path(out / f"{image_id}_{kind}.png") as tmp:
                        Image.fromarray(np.asarray(img)).save(tmp, format="PNG")
            manifest["images"][str(image_id)] = {"seed": rec.seed, "timings": rec.timings,
                                                 "files": [f"{image_id}_{k}.png" for k, v in files.items() if v is not None]}
        atomic_write_json(manifest_path, manifest)
    print(f"wrote {len(manifest['images'])} reconstructions to {out}")
    return 0
