"""Peak memory and wall time of ``load_subject`` on a full-shape synthetic NSD subject.

Builds, in a temporary folder, a subject with NSD subject 1's shapes: an 81x104x83 volume, 15,724 nsdgeneral
voxels, an NSD-shaped design (10,000 images x 3 repeats over 30,000 trials, the shared 1000 as test) and
750-trial int16 betas sessions. Writing 37 distinct sessions would take ~37 GB before gzip, so only
``--sessions K`` distinct files are written; the remaining sessions up to ``--total-sessions N`` are hard
links to them (same bytes, same read cost). ``load_subject`` then reads all N sessions, so memory and time
are those of a real N-session preparation (the per-image accumulators cover every image shown).
The betas are non-zero only inside nsdgeneral (low entropy: gzip is fast to write and read).

``load_subject`` runs in a child process; its peak RSS (``ru_maxrss``) and wall time are printed, next to
the peak RSS of a child that only imports the same modules (the baseline).

    .venv/bin/python benchmarks/nsd_prepare_memory.py --sessions 1 --total-sessions 37
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brain_diffuser_core.config import PAPER  # noqa: E402
from brain_diffuser_core.nsd_format import (  # noqa: E402
    NSDPaths,
    write_betas_hdf5,
    write_betas_nifti,
    write_expdesign,
    write_label_volume,
)

VOLUME = (81, 104, 83)

def build(root: Path, k: int, n: int, fmt: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    paths = NSDPaths(root, 1)
    n_vox = PAPER.nsd.nsdgeneral_voxels[1]
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    # nsdgeneral: the n_vox voxels nearest to a point in the back of the volume; -1 outside an ellipsoid
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in VOLUME], indexing="ij"), axis=-1).astype(np.float32)
    centre = np.array(VOLUME, np.float32) / 2
    inside = (((grid - centre) / (centre * 0.9)) ** 2).sum(-1) <= 1
    dist = np.linalg.norm(grid - np.array([40, 25, 40], np.float32), axis=-1)
    dist[~inside] = np.inf
    order = np.argsort(dist, axis=None, kind="stable")[:n_vox]
    nsdgeneral = np.where(inside, 0, -1).astype(np.int16)
    nsdgeneral.reshape(-1)[order] = 1
    write_label_volume(paths.nsdgeneral, nsdgeneral, affine)
    mask = nsdgeneral > 0
    assert int(mask.sum()) == n_vox

    shared = np.sort(rng.choice(PAPER.nsd.n_stimuli, 1000, replace=False)) + 1
    rest = rng.permutation(np.setdiff1d(np.arange(1, PAPER.nsd.n_stimuli + 1), shared))[: 8 * 9000].reshape(8, 9000)
    subjectim = np.concatenate([np.tile(shared, (8, 1)), rest], axis=1)
    masterordering = rng.permutation(np.repeat(np.arange(1, 10001), 3))
    write_expdesign(paths.expdesign, masterordering[None], subjectim, shared[None])

    tps = PAPER.nsd.trials_per_session
    for s in range(1, k + 1):
        betas = np.zeros(VOLUME + (tps,), dtype=np.int16, order="F")
        betas[mask] = rng.integers(-600, 600, size=(n_vox, tps), dtype=np.int16)
        if fmt == "nii.gz":
            write_betas_nifti(paths.betas_nifti(s), betas, affine)
        else:
            write_betas_hdf5(paths.betas_hdf5(s), betas, chunk_trials=50)
        del betas
    for s in range(k + 1, n + 1):
        src = (paths.betas_nifti if fmt == "nii.gz" else paths.betas_hdf5)((s - 1) % k + 1)
        dst = (paths.betas_nifti if fmt == "nii.gz" else paths.betas_hdf5)(s)
        os.link(src, dst)


_PEAK = (
    "\ndef _peak_mb():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1]) / 1024\n"
)


def run_child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON, to which the child's peak RSS is added.

    The peak is the child's own VmHWM (reset by exec), not ru_maxrss, which on Linux keeps the high-water
    mark of the forked copy of this (builder) process.
    """
    code = _PEAK + code + "\nimport json as _j\nprint(_j.dumps(dict(result, peak_rss_mb=_peak_mb())))\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1, help="distinct session files to write (default 1)")
    parser.add_argument("--total-sessions", type=int, default=None,
                        help="sessions load_subject reads (extra ones are hard links; default = --sessions)")
    parser.add_argument("--format", choices=("nii.gz", "hdf5"), default="nii.gz")
    parser.add_argument("--workdir", default=None, help="folder to build in (default: a temporary folder)")
    args = parser.parse_args()
    n = args.total_sessions or args.sessions
    if not 1 <= args.sessions <= n <= PAPER.nsd.n_sessions:
        parser.error(f"need 1 <= --sessions <= --total-sessions <= {PAPER.nsd.n_sessions}")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp) / "nsd"
        t0 = time.perf_counter()
        build(root, args.sessions, n, args.format)
        print(f"built {args.sessions} distinct session file(s), {n} sessions in all, in {time.perf_counter() - t0:.1f} s")
        imports = "import numpy, scipy.io, nibabel, h5py, tqdm, brain_diffuser_core.nsd"
        base = run_child(f"{imports}\nresult = {{}}")
        load = run_child(
            f"{imports}\nimport time\nfrom brain_diffuser_core.nsd import load_subject\n"
            f"t = time.perf_counter()\n"
            f"s = load_subject({str(root)!r}, 1, cache_dir={str(Path(tmp) / 'cache')!r}, progress=False)\n"
            f"result = {{'wall_s': time.perf_counter() - t, 'train': len(s.train_image_ids), "
            f"'test': len(s.test_image_ids), 'voxels': s.n_voxels, 'sessions': len(s.sessions_used)}}"
        )
    print(f"baseline (imports only) peak RSS: {base['peak_rss_mb']:.0f} MB")
    print(
        f"load_subject: {load['sessions']} sessions, {load['train']} train + {load['test']} test images, "
        f"{load['voxels']} voxels, {args.format}: wall {load['wall_s']:.1f} s, peak RSS {load['peak_rss_mb']:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
