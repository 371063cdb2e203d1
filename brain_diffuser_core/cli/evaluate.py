"""``evaluate``: the paper's metrics for a bundle on a subject's test images, beside the published table."""
from __future__ import annotations

import argparse

from ._engine import ENGINE_HELP, add_engine_arguments, run_batch, worker_threads

HELP = "score reconstructions with the paper's metrics (full, stage 1 only, stage 2 only)"

DESCRIPTION = f"""\
Reconstruct a subject's test images with a bundle and score them as the paper does:
PixCorr and SSIM (pixels), 2-way identification with CLIP (the bundle's own CLIP: ViT-L/14 with real
weights), and correlation distance with EfficientNet-Lite0 (a stand-in for the paper's EffNet-B1 column,
marked *). AlexNet / Inception / SwAV columns need torchvision and their weights (--networks alexnet2,...).

Three variants, as the paper's ablations: full (stage 1 + stage 2), stage1 (VDVAE only), stage2_only
(Versatile Diffusion from the CLIP conditions alone). The images are made on the batch layer (one item per
subject and test row, every variant) and kept under <out>/images/<variant>/<73k id>.png: a rerun skips
finished shards, other generation settings into the same <out> are refused (--networks and --pixel-size only
score, again on every run). Writes <out>/metrics.json, metrics.csv, per_image.csv, table.md and prints the
table. With several subjects (--subject 1,2,5,7 or all) each goes to <out>/subjNN/ and <out>/table.md +
metrics.json add the mean over subjects (the paper reports subject 1 and the mean over subjects 1, 2, 5, 7).

{ENGINE_HELP}
examples:
  python -m brain_diffuser_core evaluate --bundle bundles/nsd --nsd-root /data/nsd --subject 1 --out eval/subj01
  python -m brain_diffuser_core evaluate --bundle B --nsd-root W --subject all --out eval/all --trials 0-59
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..evaluation import VARIANTS
    from ._engine import add_mode_arguments

    p = subparsers.add_parser("evaluate", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, metavar="DIR", help="decoder bundle folder")
    p.add_argument("--nsd-root", required=True, metavar="DIR", help="NSD root (or a MiniNSD world folder)")
    p.add_argument("--subject", required=True, metavar="N", help="subject 1..8, a comma list, or 'all' (the bundle's)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (images, metrics)")
    p.add_argument("--trials", default="all", metavar="LIST", help="test rows: 'all' (default), '0-99', ...")
    p.add_argument("--variants", default=",".join(VARIANTS), metavar="LIST",
                   help=f"comma subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--networks", default="clip,efficientnet_lite0", metavar="LIST",
                   help="feature networks for the high-level columns (default: clip,efficientnet_lite0)")
    add_mode_arguments(p, paper_extras=", 224 px bilinear network inputs, the published column-wise SSIM")
    p.add_argument("--pixel-size", type=int, default=None, help="side for PixCorr/SSIM (default: stimulus size)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B",
                   help="images per generation batch (4; keep --shard-size a multiple of it for the "
                        "single-process batches)")
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the paper's 50)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="prepared-arrays cache (as for `prepare`)")
    p.add_argument("--judge-scenes", type=int, default=200, metavar="N",
                   help="on a MiniNSD world: fresh scenes per category that fit the independent category judge "
                        "(default: 200; cached under the cache folder)")
    add_engine_arguments(p, shard_size=8)
    p.set_defaults(func=run)
    return p


def _subjects(text: str, available) -> list[int]:
    text = text.strip().lower()
    if text == "all":
        return sorted(int(s) for s in available)
    try:
        subjects = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        subjects = []
    if not subjects or any(not 1 <= s <= 8 for s in subjects):
        raise SystemExit(f"--subject must be a subject 1..8, a comma list of them, or 'all'; {text!r} was provided")
    missing = [s for s in subjects if s not in available]
    if missing:
        raise SystemExit(f"--subject: the bundle has no decoders for subject(s) {missing}; it has {sorted(available)}")
    return list(dict.fromkeys(subjects))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..batch.evaluate import EvaluateJob, subject_prefix
    from ..bundle import load_bundle
    from ..evaluation import (check_variants, resolve_settings, score_variants, world_category_score,
                              write_subject_mean)
    from ..export import bundle_digest
    from ..nsd import load_subject
    from ..pipeline import resolve_device
    from .reconstruct import parse_rows

    bundle = load_bundle(args.bundle)
    subjects = _subjects(str(args.subject), bundle.subjects)
    variants = check_variants([v.strip() for v in args.variants.split(",") if v.strip()])
    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    kwargs = {"clip": {"path": bundle.clip_location(), "device": str(resolve_device(args.device))}}
    rescale, overrides = resolve_settings(args.paper, args.rescale,
                                          {"num_inference_steps": args.steps} if args.steps else {})
    out_root = Path(args.out)
    judge = None
    if (Path(args.nsd_root) / "world" / "image_labels.npy").is_file():  # a MiniNSD world: categories are known
        judge = world_category_score(args.nsd_root, args.cache_dir, n_per_category=args.judge_scenes)
        print(f"Category = reconstruction judged in its original's category by the independent judge: "
              f"{judge.describe()}")
    loaded, rows = {}, {}
    for number in subjects:
        loaded[number] = load_subject(args.nsd_root, number, cache_dir=args.cache_dir, progress=True)
        bundle.check_subject(number, loaded[number].n_voxels, loaded[number].mask_sha256)
        rows[number] = parse_rows(args.trials, len(loaded[number].test_image_ids))
        if len(rows[number]) < 2:
            raise ValueError(f"'--trials' must select at least 2 test images (2-way identification); "
                             f"{len(rows[number])} given")
    job, summary = run_batch(lambda: EvaluateJob(
        bundle=str(Path(args.bundle).resolve()), bundle_digest=bundle_digest(args.bundle),
        nsd_root=str(Path(args.nsd_root).resolve()), rows=rows,
        image_ids={s: [int(loaded[s].test_image_ids[r]) for r in rows[s]] for s in subjects}, variants=variants,
        base_seed=args.seed, rescale=rescale, overrides=overrides, paper=bool(args.paper), device=args.device,
        batch_size=args.batch_size, threads=worker_threads(args),
        cache_dir=args.cache_dir and str(Path(args.cache_dir).resolve())), args)
    if len(summary.rows) < summary.n_items:  # --part: another part still has shards to run
        print(f"{summary.n_items - len(summary.rows)} test row(s) still to reconstruct (other --part ranges); "
              "the metrics are written by the run that finds every shard done")
        return 0
    summaries = {}
    for number in subjects:
        out = out_root / subject_prefix(number, len(subjects))
        summaries[number] = score_variants(loaded[number], out, rows=rows[number], paths=job.paths(out_root, number),
                                           networks=networks, network_kwargs=kwargs, pixel_size=args.pixel_size,
                                           rescale=rescale, paper=args.paper, category_judge=judge)
        print((out / "table.md").read_text())
    if len(subjects) > 1:
        write_subject_mean(out_root, summaries)
        print((out_root / "table.md").read_text())
    return 0 if all(summaries.values()) else 1
