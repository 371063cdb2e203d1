"""What a download will fetch: NSD keys for one subject, the weights' files, sizes, free space, the plan table.

Planning asks only for metadata (S3 listings of a few folders, one HEAD per single file, the hub's tree
listing): a ``--dry-run`` makes no data request, and a re-run over a complete folder costs the same few
requests and no transfer.
"""
from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PAPER
from ..nsd_format import BETAS_TYPE, NSDPaths, subject_dir_name
from .errors import NO_SPACE, NOT_WRITABLE, USAGE, DownloadError
from .transfer import Remote

__all__ = ["SESSIONS_PER_SUBJECT", "ROI_NAMES", "PlanItem", "Plan", "check_sessions", "nsd_groups",
           "format_bytes", "check_space", "check_writable", "free_bytes"]

#: scan sessions of NSD subjects 1..8 (all released since 2023-08-20)
SESSIONS_PER_SUBJECT: tuple[int, ...] = (40, 40, 32, 30, 40, 32, 40, 30)
#: volume ROI files (func1pt8mm/roi/<name>.nii.gz) the library reads; nsdgeneral is the decoding mask
ROI_NAMES: tuple[str, ...] = ("nsdgeneral", "prf-visualrois", "prf-eccrois", "floc-faces", "floc-words",
                              "floc-places", "floc-bodies")
#: surface transforms the cortex views use (subject func1pt8mm -> cortical layers, white -> fsaverage)
TRANSFORM_NAMES: tuple[str, ...] = tuple(
    f"{h}.{t}.mgz" for h in ("lh", "rh")
    for t in ("func1pt8-to-layerB1", "func1pt8-to-layerB2", "func1pt8-to-layerB3", "white-to-fsaverage"))
STIMULI_KEY = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
EXPDESIGN_KEY = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO_KEY = "nsddata/experiments/nsd/nsd_stim_info_merged.csv"
#: COCO 2017 captions (the two caption JSONs are extracted next to the zip)
COCO_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
COCO_ZIP_REL = "nsddata_stimuli/stimuli/nsd/annotations/annotations_trainval2017.zip"
COCO_MEMBERS = ("annotations/captions_train2017.json", "annotations/captions_val2017.json")


def format_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def check_sessions(subject: int, sessions: list[int] | None) -> list[int]:
    """Validate ``subject`` 1..8 and ``sessions`` against that subject's real session count.

    ``None`` gives the paper's sessions 1..37 (fewer where the subject has fewer).
    """
    try:
        subject_dir_name(subject)
    except ValueError as err:
        raise DownloadError(USAGE, f"--subject: {err}; sessions per subject: "
                                   + ", ".join(f"{i + 1}: {n}" for i, n in enumerate(SESSIONS_PER_SUBJECT))) from None
    n = SESSIONS_PER_SUBJECT[subject - 1]
    if sessions is None:
        return list(range(1, min(n, PAPER.nsd.n_sessions) + 1))
    bad = [s for s in sessions if not 1 <= s <= n]
    if bad or not sessions:
        raise DownloadError(
            USAGE, f"--sessions: subject {subject} has sessions 1-{n} (NSD: 40 40 32 30 40 32 40 30 for subjects "
                   f"1-8); {bad or 'none'} {'is' if len(bad) == 1 else 'are'} outside that range")
    return sorted(set(sessions))


@dataclass
class PlanItem:
    """One file of the plan. ``rel``: path under the output folder; ``size``: bytes on disk (``estimate``:
    an upper bound); ``status``: ``fetch`` / ``resume`` / ``have`` / ``adopt`` (on disk, unrecorded: checked
    against the server) / ``missing`` (optional, not on the server)."""

    rel: str
    size: int
    remote: Remote | None = None
    source: str = "s3"
    required: bool = True
    status: str = "fetch"
    note: str = ""
    estimate: bool = False
    kind: str = "file"  # "file" | "stimuli-subset" | "extract" (members of a fetched zip)


@dataclass
class Plan:
    root: Path
    title: list[str]
    items: list[PlanItem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_fetch(self) -> int:
        """Bytes still to write (resumed parts count only their missing bytes)."""
        total = 0
        for it in self.items:
            if it.status in ("fetch", "resume"):
                part = self.root / (it.rel + ".part")
                kept = part.stat().st_size if it.status == "resume" and part.is_file() else 0
                total += max(0, it.size - kept)
        return total

    def table(self, free: int | None) -> str:
        width = max([len(it.rel) for it in self.items] + [10])
        lines = list(self.title)
        lines.append(f"  {'status':<8}{'size':>12}  {'file':<{width}}  check / note")
        for it in self.items:
            size = ("<= " if it.estimate else "") + format_bytes(it.size)
            check = it.remote.check if it.remote is not None else ""
            note = "; ".join(x for x in (check, it.note) if x)
            lines.append(f"  {it.status:<8}{size:>12}  {it.rel:<{width}}  {note}")
        total = sum(it.size for it in self.items if it.status != "missing")
        fetch = self.to_fetch()
        lines.append(f"total {format_bytes(total)} in {sum(it.status != 'missing' for it in self.items)} files; "
                     f"to fetch {format_bytes(fetch)}"
                     + (f"; free at {self.root}: {format_bytes(free)}" if free is not None else "")
                     + ("" if free is None else (" (enough)" if free >= fetch else " (NOT ENOUGH)")))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def nsd_groups(subject: int, sessions: list[int], betas: str) -> dict[str, dict]:
    """The S3 folders to list and, per folder, ``{file name: required?}`` for one subject."""
    subj = subject_dir_name(subject)
    ext = {"nii.gz": ".nii.gz", "hdf5": ".hdf5"}[betas]
    betas_dir = f"nsddata_betas/ppdata/{subj}/func1pt8mm/{BETAS_TYPE}/"
    groups = {
        "nsddata/experiments/nsd/": {"nsd_expdesign.mat": True, "nsd_stim_info_merged.csv": True},
        f"nsddata/ppdata/{subj}/func1pt8mm/roi/": {
            **{f"{r}.nii.gz": True for r in ROI_NAMES},
            **{f"{h}.{r}.nii.gz": False for h in ("lh", "rh") for r in ROI_NAMES}},
        f"nsddata/ppdata/{subj}/transforms/": {t: False for t in TRANSFORM_NAMES},
        f"nsddata/freesurfer/{subj}/label/": {
            **{f"{h}.{r}.mgz": False for h in ("lh", "rh") for r in ROI_NAMES},
            **{f"{h}.{r}.mgz.ctab": False for h in ("lh", "rh") for r in ROI_NAMES},
            **{f"{r}.mgz.ctab": False for r in ROI_NAMES}},
        betas_dir: {f"betas_session{s:02d}{ext}": True for s in sessions},
    }
    return groups


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing ancestor)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return int(shutil.disk_usage(path).free)


def check_writable(root: Path) -> None:
    """Create ``root`` and write a probe file in it, or raise NOT_WRITABLE naming the folder and the fix."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".download-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        why = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full"}.get(err.errno, err.strerror)
        code = NO_SPACE if err.errno == errno.ENOSPC else NOT_WRITABLE
        raise DownloadError(code, f"--out {root}: cannot write there ({why}). Choose a folder on a writable disk "
                                  "with enough space (see --dry-run for the size).") from None


def check_space(plan: Plan, margin_bytes: int = 64 << 20, free: int | None = None) -> int:
    """Raise NO_SPACE before the first byte when the plan does not fit; returns the free bytes."""
    free = free_bytes(plan.root) if free is None else free
    need = plan.to_fetch()
    if need + margin_bytes > free:
        raise DownloadError(
            NO_SPACE,
            f"--out {plan.root}: {format_bytes(need)} to fetch (+ {format_bytes(margin_bytes)} margin) but only "
            f"{format_bytes(free)} free. Free space, choose another --out, or fetch less (--sessions, "
            "--stimuli subset|none, --betas nii.gz). Nothing was downloaded.",
        )
    return free


def nsd_paths(root: Path, subject: int) -> NSDPaths:
    return NSDPaths(root, subject)
