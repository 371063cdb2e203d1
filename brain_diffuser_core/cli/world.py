"""``world``: the built-in MiniNSD demo world (``world build``; more actions plug into :data:`ACTIONS`)."""
from __future__ import annotations

import argparse
from typing import Callable

HELP = "build the MiniNSD demo world (simulated subjects in NSD's file formats)"

DESCRIPTION = """\
MiniNSD is a small simulated Natural Scenes Dataset: procedurally drawn, captioned scenes (faces, bodies,
places, words on signs, colourful objects, fine textures) seen by simulated subjects 1, 2, 5 and 7 whose
voxels lie on fsaverage5 with NSD's ROIs and a known tuning. It is written in NSD's own file formats, so
every command that takes --nsd-root (prepare, extract, fit, reconstruct) works on it unchanged.

actions:
  build      write the world into a folder (about 20 s and 150 MB with the defaults)
  train      train the demo models (CLIP, VDVAE, VD's VAE + UNet) on the world's train images
  validate   score ROI-optimal scenes of a bundle against the observers' known tuning

example:
  python -m brain_diffuser_core world build --out ~/mininsd
  python -m brain_diffuser_core prepare --nsd-root ~/mininsd --subject 1
"""

BUILD_DESCRIPTION = """\
Write the MiniNSD world as an NSD tree under --out: nsd_expdesign.mat, per subject betas sessions of 750
trials (int16 x 300 .nii.gz), nsdgeneral and the six NSD ROI files, the stimuli (64 px imgBrick), captions,
and the simulated observers' ground truth under <out>/world/ (tuning, voxel <-> fsaverage5 vertex maps,
scene graphs). Test images are the shared ones (masterordering <= 1000), shown --test-repeats times.

The tree is built in a temporary folder and renamed into place: an interrupted build leaves nothing behind.
A world already at --out with the same parameters and format version is kept unless --force.

example:
  python -m brain_diffuser_core world build --out ~/mininsd
  python -m brain_diffuser_core world build --out /tmp/tiny --n-train 300 --n-test 30 --subjects 1
"""


def _add_build(actions) -> argparse.ArgumentParser:
    from ..world.build import DEFAULT_PARAMS

    d = DEFAULT_PARAMS
    p = actions.add_parser("build", help="write the world into a folder", description=BUILD_DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (an NSD root for --nsd-root)")
    p.add_argument("--n-train", type=int, default=d["n_train"], metavar="N",
                   help=f"train images, seen by every subject (default: {d['n_train']})")
    p.add_argument("--n-test", type=int, default=d["n_test"], metavar="N",
                   help=f"test images, the shared set (default: {d['n_test']})")
    p.add_argument("--test-repeats", type=int, default=d["test_repeats"], metavar="R",
                   help=f"trials per test image (default: {d['test_repeats']})")
    p.add_argument("--train-repeats", type=int, default=d["train_repeats"], metavar="R",
                   help=f"trials per train image (default: {d['train_repeats']}; the last session is "
                        "topped up with extra train repeats)")
    p.add_argument("--subjects", default=",".join(str(s) for s in d["subjects"]), metavar="LIST",
                   help=f"comma-separated subset of {','.join(str(s) for s in d['subjects'])} (default: all)")
    p.add_argument("--seed", type=int, default=d["seed"], help=f"world seed (default: {d['seed']})")
    p.add_argument("--noise-sd", type=float, default=d["noise_sd"], metavar="SD",
                   help=f"trial noise, percent signal change; higher is harder (default: {d['noise_sd']})")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical world is there")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_build)
    return p


#: ``world <action>``: name -> function adding the action's parser to the ``world`` sub-parsers
def _add_train(actions) -> argparse.ArgumentParser:
    from .world_train import add_train_action  # argparse only; torch is imported when the action runs

    return add_train_action(actions)


def _add_validate(actions) -> argparse.ArgumentParser:
    from .world_validate import add_validate_action  # argparse only

    return add_validate_action(actions)


ACTIONS: dict[str, Callable] = {"build": _add_build, "train": _add_train, "validate": _add_validate}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("world", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="world_action", metavar="ACTION")
    for add in ACTIONS.values():
        add(actions)
    p.set_defaults(func=lambda args: p.print_help() or 0)
    return p


def _parse_subjects(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"'--subjects' must be a comma-separated list like '1,2,5,7'; {text!r} was provided") from None


def _run_build(args: argparse.Namespace) -> int:
    from ..world.build import build_world, read_world_info, world_is_current, world_params

    params = world_params(n_train=args.n_train, n_test=args.n_test, test_repeats=args.test_repeats,
                          train_repeats=args.train_repeats, subjects=_parse_subjects(args.subjects),
                          seed=args.seed, noise_sd=args.noise_sd)
    if not args.force and world_is_current(args.out, params):
        info = read_world_info(args.out)
        print(f"world at {args.out} is up to date (format v{info.version}); use --force to rebuild")
        return 0
    from ._progress import step_bar

    bar, progress = step_bar("world build", "step", disable=args.no_progress)

    try:
        info = build_world(args.out, progress=progress, **params)
    finally:
        bar.close()
    print(f"world          {info.root} (format v{info.version})")
    print(f"images         {info.n_images} ({len(info.train_image_ids)} train, {len(info.test_image_ids)} test "
          f"x {params['test_repeats']} repeats)")
    print(f"sessions       {info.n_sessions} x 750 trials per subject")
    print("voxels         " + ", ".join(f"subj{s:02d} {n}" for s, n in info.n_voxels.items()))
    print(f"size           {info.size_bytes / 1e6:.1f} MB")
    print(f"time           {info.build_seconds:.1f} s")
    return 0
