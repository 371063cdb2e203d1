"""``extract``: VDVAE latents and CLIP text/vision embeddings of one subject's images, streamed and resumable."""
from __future__ import annotations

import argparse

from ..config import FEATURE_NAMES, PAPER

HELP = "compute VDVAE and CLIP features of a subject's train and test images (needs model weights)"

DESCRIPTION = f"""\
Compute the three feature spaces Brain-Diffuser decodes, for every image the subject saw:

  vdvae        first {PAPER.stage1.n_feature_layers} VDVAE latent layers, ({PAPER.stage1.feature_dim},) per image
               (ImageNet-64 checkpoint {PAPER.stage1.checkpoint_name})
  clip_text    CLIP ViT-L/14 text tokens (77, 768), Versatile Diffusion's normalisation, averaged over captions
  clip_vision  CLIP ViT-L/14 vision tokens (257, 768), Versatile Diffusion's normalisation

Images are streamed from nsd_stimuli.hdf5 one batch at a time (the 40 GB file is never loaded) and written as
shards under --out/<feature>/; a rerun skips images already written, so an interrupted run resumes.
The subject must be prepared first (`prepare`): the image list is the one its fMRI arrays use.

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
    p.set_defaults(func=run)
    return p


def _parse_list(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"'{what}' must be a comma-separated subset of {list(allowed)}; {text!r} was provided")
    return items


def run(args: argparse.Namespace) -> int:
    from ..features.extract import extract_features, image_ids_of
    from ..nsd import load_subject
    from ..pipeline import resolve_device

    names = _parse_list(args.features, FEATURE_NAMES, "--features")
    splits = _parse_list(args.split, ("train", "test"), "--split")
    if "vdvae" in names and not args.vdvae:
        raise ValueError("'--vdvae' is required to extract vdvae features: pass the checkpoint path "
                         f"({PAPER.stage1.checkpoint_name}) or leave vdvae out of --features")
    device = resolve_device(args.device)
    subject = load_subject(args.nsd_root, args.subject, cache_dir=args.cache_dir, progress=True)
    vdvae = clip = None
    if "vdvae" in names:
        from ..features.vdvae import load_vdvae

        vdvae = load_vdvae(args.vdvae, device=device)
    if {"clip_text", "clip_vision"} & set(names):
        from ..features.clip import ClipFeatureExtractor

        clip = ClipFeatureExtractor.from_pretrained(args.clip, device=device)
    n_images = len(image_ids_of(subject, splits))
    print(f"subject {args.subject}: {n_images} images ({'+'.join(splits)}) into {args.out} on {device}")
    counts = extract_features(subject, args.out, vdvae=vdvae, clip=clip, feature_names=names, splits=splits,
                              batch_size=args.batch_size, dtype=args.dtype, vdvae_mode=args.vdvae_mode,
                              progress=True)
    print(f"done: {', '.join(f'{n} {c}' for n, c in counts.items())} of the subject's images in {args.out}")
    return 0
