"""``prepare``: read one NSD subject's betas, average repeats, z-score with train statistics, cache the arrays."""
from __future__ import annotations

import argparse
import resource
import sys
import time

HELP = "read NSD betas for one subject and cache the prepared fMRI arrays"

DESCRIPTION = """\
Prepare one Natural Scenes Dataset subject the way Brain-Diffuser does:

  * reads nsddata/experiments/nsd/nsd_expdesign.mat, the subject's nsdgeneral mask and
    nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionNN.(hdf5|nii.gz);
  * keeps the nsdgeneral voxels, divides betas by 300, averages the repeats of each image;
  * splits train / test (the shared 1000 images), z-scores every voxel with the TRAIN mean and std;
  * caches float32 arrays under --cache-dir (default: $BRAIN_DIFFUSER_CACHE/nsd or ~/.cache/...).

Sessions are streamed one at a time; a full subject (37 sessions) needs about 1 GB of memory.
Running it again with the same inputs reads the cache in seconds.

example:
  python -m brain_diffuser_core prepare --nsd-root /data/nsd --subject 1
  python -m brain_diffuser_core prepare --nsd-root /data/nsd --subject 1 --sessions 1-10 --cache-dir /tmp/bd
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prepare", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nsd-root", required=True, metavar="DIR",
                        help="NSD root folder (the one holding nsddata/, nsddata_betas/, nsddata_stimuli/)")
    parser.add_argument("--subject", required=True, type=int, choices=range(1, 9), metavar="N",
                        help="subject number 1..8 (the paper uses 1, 2, 5, 7)")
    parser.add_argument("--sessions", default=None, metavar="LIST",
                        help="sessions to read, e.g. '1-37' or '1,3,5-7' (default: every session found)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="where prepared arrays are cached (default: <cache root>/nsd)")
    parser.add_argument("--betas-format", default="auto", choices=("auto", "nii.gz", "hdf5"),
                        help="which betas files to read; auto prefers .hdf5, falls back to .nii.gz (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)
    return parser


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run(args: argparse.Namespace) -> int:
    from ..nsd import load_subject, parse_sessions

    sessions = parse_sessions(args.sessions) if args.sessions else None
    start = time.perf_counter()
    subject = load_subject(
        args.nsd_root,
        args.subject,
        sessions=sessions,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        betas_format=args.betas_format,
    )
    elapsed = time.perf_counter() - start
    used = ", ".join(str(s) for s in subject.sessions_used)
    print(f"subject        {subject.subject}")
    print(f"sessions used  {len(subject.sessions_used)}: {used}")
    print(f"train images   {len(subject.train_image_ids)}")
    print(f"test images    {len(subject.test_image_ids)}")
    print(f"voxels         {subject.n_voxels} (nsdgeneral, volume {subject.volume_shape})")
    print(f"mask sha256    {subject.mask_sha256[:16]}...")
    print(f"cache          {subject.cache_path} ({'read from cache' if subject.loaded_from_cache else 'written'})")
    print(f"time           {elapsed:.1f} s")
    print(f"peak RSS       {_peak_rss_mb():.0f} MB")
    return 0
