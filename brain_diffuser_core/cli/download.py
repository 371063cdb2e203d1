"""``download nsd|weights|verify``: get one subject's NSD data and the real weights; check a copy offline."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..download.errors import EXIT_CODES

HELP = "download one subject's NSD data or the model weights (resumable, verified); verify a copy offline"

DESCRIPTION = """\
Get what the real pipeline needs, with one command each:

  download nsd      one subject's NSD files from the public S3 bucket (unsigned: no AWS account needed), in the
                    NSD layout that `prepare` reads, plus the surface transforms and labels; shared files
                    (design, stimuli, captions) are stored once per folder
  download weights  the VDVAE checkpoint and Versatile Diffusion (diffusers components at a pinned revision;
                    never its 31.6 GB pretrained_pth/), and models.json for `fit --models-json`
  download verify   offline: every file against the manifest's sha256 (for copies to clusters without internet)

Every transfer resumes: an interrupted run (dropped connection, Ctrl-C, a killed job) continues from the last
verified block on the next run; a complete folder costs a few metadata requests and no transfer.

exit codes:
""" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items()) + """

examples:
  python -m brain_diffuser_core download nsd --subject 1 --out /data/nsd --dry-run
  python -m brain_diffuser_core download nsd --subject 1 --out /data/nsd --accept-nsd-terms
  python -m brain_diffuser_core download weights --out /weights
  python -m brain_diffuser_core download verify --root /data/nsd
"""

NSD_DESCRIPTION = """\
Download one NSD subject (Allen et al. 2022) from s3://natural-scenes-dataset.

The NSD terms of use are printed; a real run needs --accept-nsd-terms (or BRAIN_DIFFUSER_ACCEPT_NSD_TERMS=1),
and the acceptance is recorded in ROOT/download-manifest.json. --dry-run needs no acceptance and makes no data
request: it prints every file, its size, the total and the free space.

Sizes (subject 1, paper setup, .nii.gz betas): about 23 GB with the stimulus subset, 57 GB with the whole
39.6 GB stimulus file. Sessions per subject: 40 40 32 30 40 32 40 30 (subjects 1-8).
"""


# each subcommand's options as (flags, add_argument keywords), in --help order
#: the transfer options `nsd` and `weights` share
_TRANSFER_OPTIONS = (
    (("--jobs",), dict(type=int, default=4, metavar="N", help="files (or image ranges) fetched at once (default 4)")),
    (("--dry-run",), dict(action="store_true", help="print the plan (files, sizes, free space) and stop")),
    (("--no-progress",), dict(action="store_true", help="hide the progress bars")),
    (("--retries",), dict(type=int, default=8, metavar="N",
                          help="consecutive failures of one file before giving up (default 8; back-off doubles from "
                               "0.5 s)")),
)
_NSD_OPTIONS = (
    (("--subject",), dict(required=True, type=int, metavar="N", help="subject 1..8 (the paper: 1, 2, 5, 7)")),
    (("--out",), dict(required=True, metavar="ROOT", help="NSD root folder to fill (created if needed)")),
    (("--sessions",), dict(default=None, metavar="LIST",
                           help="sessions, e.g. '1-37' or '1,3,5-7' (default 1-37, the paper's; fewer where the "
                                "subject has fewer)")),
    (("--betas",), dict(default="nii.gz", choices=("nii.gz", "hdf5"),
                        help="betas format: nii.gz (~0.47 GB a session) or hdf5 (~1 GB, faster to read; default "
                             "nii.gz)")),
    (("--stimuli",), dict(default="subset", choices=("subset", "full", "none"),
                          help="subset: only the images the chosen sessions showed, by exact Range reads (default); "
                               "full: the whole 39.6 GB file; none")),
    (("--captions",), dict(default="coco", choices=("coco", "none"),
                           help="coco: COCO 2017 annotations zip (241 MB) and its two caption JSONs (default); none")),
    (("--s3-endpoint",), dict(default=None, metavar="URL", help="S3 endpoint (mirrors, tests; default AWS)")),
    (("--coco-url",), dict(default=None, metavar="URL", help="where the COCO annotations zip comes from")),
    (("--accept-nsd-terms",), dict(action="store_true", help="accept the NSD terms of use (printed)")),
) + _TRANSFER_OPTIONS
_WEIGHTS_OPTIONS = (
    (("--out",), dict(required=True, metavar="DIR", help="folder for vdvae/ and versatile-diffusion/")),
    (("--hf-endpoint",), dict(default=None, metavar="URL", help="Hugging Face hub endpoint (mirrors, tests)")),
    (("--vdvae-url",), dict(default=None, metavar="URL", help="where the VDVAE checkpoint comes from")),
    (("--vdvae-sha256",), dict(default=None, metavar="HEX", help="a trusted sha256 of the VDVAE file to check")),
) + _TRANSFER_OPTIONS
_VERIFY_OPTIONS = (
    (("--root",), dict(required=True, metavar="ROOT", help="a folder filled by download nsd or weights")),
    (("--no-progress",), dict(action="store_true", help="hide the progress bar")),
)


def _subcommand(sub, name: str, options, func, **parser_kwargs) -> argparse.ArgumentParser:
    """One `download` subcommand: its parser (``parser_kwargs``: help, description, ...), ``options`` (a table
    of (flags, add_argument keywords)) and the function it runs."""
    p = sub.add_parser(name, **parser_kwargs)
    for flags, kwargs in options:
        p.add_argument(*flags, **kwargs)
    p.set_defaults(func=func)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("download", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", metavar="WHAT")
    _subcommand(sub, "nsd", _NSD_OPTIONS, run_nsd, help="one subject's NSD files", description=NSD_DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    _subcommand(sub, "weights", _WEIGHTS_OPTIONS, run_weights, help="VDVAE + Versatile Diffusion, and models.json",
                description="Download the VDVAE checkpoint (OpenAI) and Versatile Diffusion's diffusers components "
                            "at a pinned revision; write DIR/models.json for `fit`.")
    _subcommand(sub, "verify", _VERIFY_OPTIONS, run_verify, help="check a downloaded folder offline against its manifest",
                description="Offline: every file in ROOT/download-manifest.json must exist with its size and "
                            "sha256. Names what is missing or changed; exit 5 when anything is.")
    parser.set_defaults(func=lambda args: parser.print_help() or 0)
    return parser


def _policy(args):
    from ..download.transfer import Policy

    return Policy(retries=max(0, int(args.retries)))


def _guard(fn):
    def wrapped(args) -> int:
        from ..download.errors import DownloadError

        try:
            return fn(args)
        except DownloadError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.code

    return wrapped


def _finish(report, args) -> int:
    if not args.dry_run:
        print(report.summary())
    return 0


@_guard
def run_nsd(args) -> int:
    from ..download.errors import USAGE, DownloadError
    from ..download.plan import COCO_ANNOTATIONS_URL
    from ..download.run import NSDOptions, download_nsd
    from ..nsd import parse_sessions

    try:
        sessions = parse_sessions(args.sessions) if args.sessions else None
    except ValueError as err:
        raise DownloadError(USAGE, f"--sessions: {err}") from None
    opts = NSDOptions(subject=args.subject, out=Path(args.out), sessions=sessions, betas=args.betas,
                      stimuli=args.stimuli, captions=args.captions, jobs=args.jobs, s3_endpoint=args.s3_endpoint,
                      coco_url=args.coco_url or COCO_ANNOTATIONS_URL, dry_run=args.dry_run,
                      accept_terms=args.accept_nsd_terms, progress=not args.no_progress, policy=_policy(args))
    return _finish(download_nsd(opts), args)


@_guard
def run_weights(args) -> int:
    from ..download.run import VDVAE_SHA256, VDVAE_URL, WeightsOptions, download_weights

    opts = WeightsOptions(out=Path(args.out), hf_endpoint=args.hf_endpoint, vdvae_url=args.vdvae_url or VDVAE_URL,
                          vdvae_sha256=args.vdvae_sha256 or VDVAE_SHA256, jobs=args.jobs, dry_run=args.dry_run,
                          progress=not args.no_progress, policy=_policy(args))
    return _finish(download_weights(opts), args)


@_guard
def run_verify(args) -> int:
    from ..cli._progress import step_bar
    from ..download.errors import VERIFY_FAILED
    from ..download.manifest import verify

    bar, progress = step_bar("verify", "B", disable=args.no_progress)
    try:
        report = verify(args.root, progress=progress)
    finally:
        bar.close()
    for line in report.lines():
        print(line)
    if report.ok:
        print(f"verified {report.checked} files in {args.root}: all present and unchanged")
        return 0
    print(f"verification FAILED for {args.root}: re-run the download command that filled it (it re-fetches only "
          "what is missing or changed)", file=sys.stderr)
    return VERIFY_FAILED
