"""``extract``: VDVAE latents and CLIP text/vision embeddings of one subject's images, streamed and resumable."""
from __future__ import annotations

import argparse

from ..config import FEATURE_NAMES, PAPER
from ._engine import ENGINE_HELP, add_engine_arguments, run_batch, worker_threads

HELP = "compute VDVAE and CLIP features of a subject's train and test images (needs model weights)"

DESCRIPTION = f"""\
Compute the three feature spaces Brain-Diffuser decodes, for every image the subject saw:

  vdvae        first {PAPER.stage1.n_feature_layers} VDVAE latent layers, ({PAPER.stage1.feature_dim},) per image
               (ImageNet-64 checkpoint {PAPER.stage1.checkpoint_name})
  clip_text    CLIP ViT-L/14 text tokens (77, 768), Versatile Diffusion's normalisation, averaged over captions
  clip_vision  CLIP ViT-L/14 vision tokens (257, 768), Versatile Diffusion's normalisation

Images are streamed from nsd_stimuli.hdf5 one batch at a time (the 40 GB file is never loaded) and written as
shards under --out/<feature>/ (one per --shard-size images); a rerun skips finished shards, so an interrupted
run resumes, and a rerun with other settings is refused. The subject must be prepared first (`prepare`): the
image list is the one its fMRI arrays use.

{ENGINE_HELP}
example:
  python -m brain_diffuser_core extract --nsd-root /data/nsd --subject 1 --out feats/subj01 \\
      --vdvae /weights/{PAPER.stage1.checkpoint_name} --clip {PAPER.stage2.clip_model_id}
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("extract", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsd-root", required=True, metavar="DIR", help="NSD root folder")
    p.add_argument("--subject", required=True, type=int, choices=range(1, 9), metavar="N", help="subject 1..8")
    p.add_argument("--out", required=True, metavar="DIR", help="feature folder to write (read by `fit --features`)")
    p.add_argument("--features", default=",".join(FEATURE_NAMES), metavar="LIST",
                   help=f"comma-separated subset of {','.join(FEATURE_NAMES)} (default: all)")
    p.add_argument("--vdvae", default=None, metavar="PATH",
                   help=f"VDVAE checkpoint ({PAPER.stage1.checkpoint_name} or a .safetensors); needed for vdvae")
    p.add_argument("--clip", default=PAPER.stage2.clip_model_id, metavar="PATH_OR_ID",
                   help="CLIP folder, Versatile Diffusion folder, or a model id in the local Hugging Face cache "
                        f"(default: {PAPER.stage2.clip_model_id})")
    p.add_argument("--vdvae-mode", default="sample", choices=("sample", "mean"),
                   help="posterior samples (the original scripts) or posterior means (default: sample)")
    p.add_argument("--split", default="train,test", metavar="LIST", help="which images: train, test or both")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per batch (default: 16)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored feature dtype")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="prepared-arrays cache (as for `prepare`)")
    add_engine_arguments(p, shard_size=64)
    p.set_defaults(func=run)
    return p


def _parse_list(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"'{what}' must be a comma-separated subset of {list(allowed)}; {text!r} was provided")
    return items


def run(args: argparse.Namespace) -> int:
    from ..batch.extract import build_extract_job

    names = _parse_list(args.features, FEATURE_NAMES, "--features")
    splits = _parse_list(args.split, ("train", "test"), "--split")
    if "vdvae" in names and not args.vdvae:
        raise ValueError("'--vdvae' is required to extract vdvae features: pass the checkpoint path "
                         f"({PAPER.stage1.checkpoint_name}) or leave vdvae out of --features")
    if args.device != "auto" and args.engine == "local":
        from ..pipeline import resolve_device

        resolve_device(args.device)  # a CUDA device asked of a machine without one: said before any loading
    _, summary = run_batch(lambda: build_extract_job(
        args.nsd_root, args.subject, args.out, names, splits, vdvae=args.vdvae, clip=args.clip,
        vdvae_mode=args.vdvae_mode, dtype=args.dtype, device=args.device, batch_size=args.batch_size,
        threads=worker_threads(args), cache_dir=args.cache_dir), args)
    print(f"done: {len(summary.rows)} of the subject's {summary.n_items} images ({', '.join(names)}) in {args.out}")
    return 0
