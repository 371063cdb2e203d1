"""``world train``: train the MiniNSD demo models (argument parsing only; the work is in ``world/train.py``).

Plugged into ``world`` through :data:`brain_diffuser_core.cli.world.ACTIONS` as ``"train": add_train_action``.
Importing this module does not import torch.
"""
from __future__ import annotations

import argparse

HELP = "train the demo models (CLIP, VDVAE, VD's VAE and UNet) on the world's train images"

DESCRIPTION = """\
Train small models of the real architectures on the MiniNSD world's TRAIN images (never the test images)
and write them where the demo bundle looks for them (assets/demo/models by default):

  clip    CLIP text + vision towers (transformers CLIPModel at the tiny VD config), contrastive loss
  vdvae   VDVAE at 64 px (VDVAEConfig.tiny(64)), ELBO
  vae     Versatile Diffusion's KL-VAE (64 px <-> 4x16x16) as a near-identity autoencoder, on 32 px windows
  unet    Versatile Diffusion's image UNet with dual text/vision guidance on the trained CLIP's tokens,
          10% unconditional items for classifier-free guidance

The VAE and the UNet also learn from --generator-scenes freshly drawn scenes (never the world's test images),
as the real Versatile Diffusion learnt from images that are not NSD's. --reuse clip,vdvae keeps those stages'
weights from the models already in --reuse-from (default --out) and trains only the others.

Outputs: <out>/vdvae.safetensors + vdvae.json, <out>/versatile-diffusion/ (diffusers layout with the CLIP
towers inside), <out>/training.json and, last, <out>/MANIFEST.json (size and sha256 of every model file;
the demo refuses missing or corrupt files and names them). --manifest-only (re)writes MANIFEST.json for an
existing folder without training. Checkpoints go to --work every 200 steps; an interrupted run (Ctrl-C)
resumes there. Expected time on 2 CPU cores with the default steps: about 1.5-2 hours (use --minutes to cap it;
each stage gets a share); a GPU does it in minutes.

examples:
  python -m brain_diffuser_core world train --out assets/demo/models --minutes 90
  python -m brain_diffuser_core world train --steps all=3 --out /tmp/smoke      # a smoke run
  python -m brain_diffuser_core world train --manifest-only --out assets/demo/models
  python -m brain_diffuser_core world train --reuse clip,vdvae --steps vae=1500,unet=4000 --threads 1
"""


def add_train_action(actions) -> argparse.ArgumentParser:
    """Add ``train`` to the ``world`` action sub-parsers."""
    p = actions.add_parser("train", help=HELP, description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/demo/models", metavar="DIR",
                   help="where the trained models go (default: assets/demo/models)")
    p.add_argument("--minutes", type=float, default=None, metavar="M", help="wall-clock cap for the whole run")
    p.add_argument("--steps", default=None, metavar="LIST",
                   help="total steps per stage, e.g. clip=3000,vdvae=4000,vae=1500,unet=8000 (the defaults) or all=5")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="checkpoints, resumable (default: <cache>/demo-training)")
    p.add_argument("--world-root", default=None, metavar="DIR", help="a built world (default: the app's cached world)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="cache folder (default: $BRAIN_DIFFUSER_CACHE)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--threads", type=int, default=2, metavar="T", help="torch CPU threads (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--generator-scenes", type=int, default=None, metavar="N",
                   help="fresh scenes for the VAE and UNet besides the world's train images (default: 6000)")
    p.add_argument("--reuse", default="", metavar="LIST",
                   help="stages (clip, vdvae) whose weights are kept from --reuse-from instead of trained")
    p.add_argument("--reuse-from", default=None, metavar="DIR",
                   help="models folder for --reuse and --warm-start (default: --out)")
    p.add_argument("--warm-start", default="", metavar="LIST",
                   help="stages (vae, unet) that start from --reuse-from's weights and train --steps more steps")
    p.add_argument("--manifest-only", action="store_true",
                   help="only (re)write <out>/MANIFEST.json for the model files already there (no training)")
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    import json

    if args.manifest_only:
        import sys

        from ..world.demo import DemoModelsError, write_models_manifest

        try:
            path = write_models_manifest(args.out)
        except DemoModelsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        n = len(json.loads(path.read_text())["files"])
        print(f"{path} written ({n} model files)")
        return 0

    from ..world.train import GENERATOR_SCENES, STAGES, parse_steps, train_demo_models

    reuse = [s.strip() for s in args.reuse.split(",") if s.strip()]
    scenes = GENERATOR_SCENES if args.generator_scenes is None else args.generator_scenes
    out = train_demo_models(args.out, world_root=args.world_root, cache_dir=args.cache_dir, work=args.work,
                            steps=parse_steps(args.steps), minutes=args.minutes, seed=args.seed,
                            threads=args.threads, device=args.device, progress=not args.no_progress,
                            generator_scenes=scenes, reuse=reuse, reuse_from=args.reuse_from,
                            warm_start=[s.strip() for s in args.warm_start.split(",") if s.strip()])
    record = json.loads((out / "training.json").read_text())
    for stage, info in sorted(record["stages"].items(), key=lambda kv: STAGES.index(kv[0])):
        if "reused_from" in info:
            print(f"{stage:6s} reused from {info['reused_from']}")
            continue
        first, final = info["first_loss"], info["final_loss"]
        losses = "no steps" if first is None else f"loss {first:.4f} -> {final:.4f}"
        print(f"{stage:6s} {info['steps']:6d} steps  {losses}  ({info['seconds_this_run']:.0f} s this run)")
    print(f"demo models written to {out}")
    return 0
