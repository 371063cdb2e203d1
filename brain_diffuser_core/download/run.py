"""Running a plan: NSD for one subject, the weights, each file through the one transfer loop.

:func:`download_nsd` and :func:`download_weights` plan (metadata only), print the plan, check the terms, the
folder and the free space before the first byte, then fetch what is missing with ``jobs`` threads, record each
finished file in the manifest and return a :class:`RunReport`. Files already recorded (same size, ETag and
mtime) cost nothing; files on disk that the manifest does not know are checked against the server's checksums
and adopted, or refused when they differ (another subject's file, a different version).
"""
from __future__ import annotations

import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..io import atomic_path, atomic_write_json, sha256_file
from . import plan as P
from .errors import MISSING_OR_DENIED, VERIFY_FAILED, DownloadError
from .manifest import Manifest, utc_now
from .transfer import Policy, Remote, RemoteError, _remote_error, check_local, fetch, part_paths

__all__ = ["NSDOptions", "WeightsOptions", "RunReport", "plan_nsd", "download_nsd", "plan_weights",
           "download_weights", "VD_REPO", "VD_REVISION", "VD_COMPONENTS", "VDVAE_URL", "VDVAE_NAME"]

VD_REPO = "shi-labs/versatile-diffusion"
#: head of main when this was written; a 40-character revision makes the hub's answers immutable
VD_REVISION = "2926f8e11ea526b562cd592b099fcf9c2985d0b7"
#: the diffusers components Brain-Diffuser uses (``pretrained_pth/``, 31.6 GB of original checkpoints, never)
VD_COMPONENTS = ("image_feature_extractor", "image_encoder", "image_unet", "scheduler", "text_encoder", "text_unet",
                 "tokenizer", "vae")
VDVAE_URL = ("https://openaipublic.blob.core.windows.net/very-deep-vaes-assets/vdvae-assets-2/"
             "imagenet64-iter-1600000-model-ema.th")
VDVAE_NAME = "imagenet64-iter-1600000-model-ema.th"
#: no trusted sha256 of the VDVAE file is pinned yet (Content-MD5 is checked when the server sends it)
VDVAE_SHA256: str | None = None


@dataclass
class NSDOptions:
    subject: int
    out: Path
    sessions: list[int] | None = None
    betas: str = "nii.gz"
    stimuli: str = "subset"
    captions: str = "coco"
    jobs: int = 4
    s3_endpoint: str | None = None
    coco_url: str = P.COCO_ANNOTATIONS_URL
    dry_run: bool = False
    accept_terms: bool = False
    progress: bool = True
    policy: Policy = field(default_factory=Policy)
    environ: dict | None = None


@dataclass
class WeightsOptions:
    out: Path
    hf_endpoint: str | None = None
    vdvae_url: str = VDVAE_URL
    vdvae_sha256: str | None = VDVAE_SHA256
    revision: str = VD_REVISION
    jobs: int = 4
    dry_run: bool = False
    progress: bool = True
    policy: Policy = field(default_factory=Policy)


@dataclass
class RunReport:
    plan: P.Plan
    fetched_bytes: int = 0  # over the network, all attempts (metadata of the stimuli file included)
    files_fetched: int = 0
    files_adopted: int = 0
    files_present: int = 0
    retries: int = 0
    restarts: int = 0
    resumed_bytes: int = 0
    subset: object | None = None  # stimuli.SubsetResult
    warnings: list[str] = field(default_factory=list)
    per_file: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"done: {self.files_fetched} fetched, {self.files_adopted} checked and adopted, "
                 f"{self.files_present} already present; {P.format_bytes(self.fetched_bytes)} received"
                 + (f", {self.retries} retries" if self.retries else "")
                 + (f", {self.restarts} restarts" if self.restarts else "")
                 + (f", {P.format_bytes(self.resumed_bytes)} kept from an earlier run" if self.resumed_bytes else "")]
        if self.subset is not None:
            s = self.subset
            lines.append(f"stimuli subset: {s.n_images} images ({s.fetched_images} fetched now, "
                         f"{P.format_bytes(s.data_bytes)} of pixels in {s.requests} requests, "
                         f"{P.format_bytes(s.metadata_bytes)} of HDF5 metadata)")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Progress:
    """tqdm in total (bytes) and per file; thread-safe byte counts for the report."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.enabled = enabled
        self.lock = threading.Lock()
        self.fetched = 0
        self.total = tqdm(total=total, unit="B", unit_scale=True, desc="total", disable=not enabled, position=0)

    def file_bar(self, name: str, size: int):
        bar = self._tqdm(total=size, unit="B", unit_scale=True, desc=name[-40:], leave=False,
                         disable=not self.enabled)

        def on_bytes(n: int) -> None:
            with self.lock:
                if n > 0:
                    self.fetched += n
                bar.update(n)
                self.total.update(n)

        return bar, on_bytes

    def close(self) -> None:
        self.total.close()


# ------------------------------------------------------------------------------------------------ items
def _status(root: Path, manifest: Manifest, rel: str, size: int, etag: str | None) -> str:
    if manifest.is_current(rel, size, etag):
        return "have"
    if part_paths(root / rel)[0].exists():
        return "resume"
    if (root / rel).exists():
        return "adopt"
    return "fetch"


def _run_item(item: P.PlanItem, source, remote_of: Callable[[], Remote], root: Path, manifest: Manifest,
              progress: _Progress, policy: Policy, report: RunReport) -> None:
    """Fetch (or adopt) one planned file and record it in the manifest."""
    dest = root / item.rel
    try:
        remote = remote_of()
    except RemoteError as err:
        raise _remote_error(Remote(item.rel, item.rel, item.size), dest, err) from None
    if item.status == "adopt":
        ok, sha, why = check_local(source, remote, dest)
        if not ok:
            raise DownloadError(
                VERIFY_FAILED,
                f"{dest} exists but is not {remote.display} ({why}): another subject's or another version's file? "
                "Move it away (or delete it) and re-run; nothing was overwritten.")
        manifest.record(item.rel, {"size": remote.size, "sha256": sha, "source": remote.display,
                                   "etag": item_etag(remote), "check": remote.check, "adopted": True})
        with progress.lock:
            report.files_adopted += 1
        return
    bar, on_bytes = progress.file_bar(item.rel, remote.size)
    warnings: list[str] = []
    try:
        result = fetch(source, remote, dest, policy=policy, on_bytes=on_bytes, warn=warnings.append, refresh=remote_of)
    finally:
        bar.close()
    manifest.record(item.rel, {"size": result.size, "sha256": result.sha256, "source": remote.display,
                               "etag": item_etag(remote), "check": result.check})
    with progress.lock:
        report.files_fetched += 1
        report.retries += result.retries
        report.restarts += result.restarts
        report.resumed_bytes += result.resumed_from
        report.warnings += warnings
        report.per_file[item.rel] = {"size": result.size, "fetched": result.fetched, "resumed_from": result.resumed_from,
                                     "retries": result.retries, "restarts": result.restarts}


def item_etag(remote: Remote) -> str | None:
    """What identifies the remote version in the manifest: the ETag, else the expected checksum."""
    return remote.etag or remote.sha256 or remote.git_sha1 or remote.md5


def _execute(items, runner, jobs: int) -> None:
    """Run ``runner(item)`` over ``items`` with ``jobs`` threads; every failure is printed, the first raised."""
    errors: list[DownloadError] = []

    def guarded(item):
        if errors:
            return
        try:
            runner(item)
        except DownloadError as err:
            errors.append(err)
            _say(f"error: {err}")

    with ThreadPoolExecutor(max_workers=max(1, int(jobs))) as pool:
        list(pool.map(guarded, items))
    if errors:
        raise errors[0]


def _start(root: Path, dry_run: bool) -> Manifest:
    if not dry_run:
        P.check_writable(root)
    manifest = Manifest.load(root)
    if manifest.problem:
        _say(f"warning: {manifest.problem}; its entries are ignored: files on disk are checked against the server "
             "again (not fetched again when they match)")
    return manifest


# ------------------------------------------------------------------------------------------------ NSD
def plan_nsd(opts: NSDOptions, s3, manifest: Manifest) -> tuple[P.Plan, dict]:
    """(plan, {rel: S3Object}) for ``opts``; raises MISSING_OR_DENIED listing every required key not found."""
    from .stimuli import local_present, shown_image_ids

    root = Path(opts.out)
    sessions = P.check_sessions(opts.subject, opts.sessions)
    n_all = P.SESSIONS_PER_SUBJECT[opts.subject - 1]
    title = [f"NSD download plan: subject {opts.subject}, sessions {_ranges_text(sessions)} ({len(sessions)} of "
             f"{n_all}), betas {opts.betas}, stimuli {opts.stimuli}, captions {opts.captions}",
             f"from {s3.name}  to {root}"]
    plan = P.Plan(root, title)
    objects: dict[str, object] = {}
    missing: list[str] = []
    try:
        for prefix, wanted in P.nsd_groups(opts.subject, sessions, opts.betas).items():
            listing = s3.list_folder(prefix)
            absent_optional = []
            for name, required in wanted.items():
                key = prefix + name
                if key == P.STIM_INFO_KEY and opts.captions == "none":
                    continue
                obj = listing.get(key)
                if obj is None:
                    (missing if required else absent_optional).append(key)
                    continue
                objects[key] = obj
                plan.items.append(P.PlanItem(key, obj.size, required=required, note=_etag_check(obj.etag),
                                             status=_status(root, manifest, key, obj.size, obj.etag)))
            if absent_optional and not any(k.startswith(prefix) for k in objects):
                plan.warnings.append(f"no optional file found under s3://{s3.bucket}/{prefix} (surface views "
                                     "need them)")
        if opts.stimuli != "none":
            obj = s3.head(P.STIMULI_KEY)
            objects[P.STIMULI_KEY] = obj
            if opts.stimuli == "full":
                plan.items.append(P.PlanItem(P.STIMULI_KEY, obj.size, note=_etag_check(obj.etag),
                                             status=_status(root, manifest, P.STIMULI_KEY, obj.size, obj.etag)))
            else:
                image_bytes = 425 * 425 * 3
                design = root / P.EXPDESIGN_KEY
                exact = manifest.is_current(P.EXPDESIGN_KEY, objects[P.EXPDESIGN_KEY].size,
                                            objects[P.EXPDESIGN_KEY].etag) if P.EXPDESIGN_KEY in objects else False
                if exact:
                    ids = shown_image_ids(design, opts.subject, sessions)
                    n = int(ids.size)
                else:
                    ids, n = None, min(10000, 750 * len(sessions))
                dest = root / P.STIMULI_KEY
                status = "fetch"
                entry = manifest.files.get(P.STIMULI_KEY)
                if part_paths(dest)[0].exists():
                    status = "resume"
                elif (dest.exists() and entry and entry.get("source_etag") == obj.etag and ids is not None
                      and manifest.is_current(P.STIMULI_KEY, entry.get("size"), entry.get("etag"))):
                    present = local_present(dest)
                    if present is not None and bool(present[ids].all()):
                        status = "have"
                size = dest.stat().st_size if status == "have" else n * image_bytes
                item = P.PlanItem(P.STIMULI_KEY, size, status=status, kind="stimuli-subset",
                                  estimate=ids is None,
                                  note=f"{n:,} images x {image_bytes:,} B by Range from the "
                                       f"{P.format_bytes(obj.size)} file" + ("" if ids is not None else
                                       " (at most; exact once the design file is here)"))
                plan.items.append(item)
    except RemoteError as err:
        raise _remote_error(Remote(s3.name, s3.name, 0), root, err) from None
    if missing:
        raise DownloadError(
            MISSING_OR_DENIED,
            f"required NSD files not found on {s3.name}:\n  " + "\n  ".join(missing)
            + f"\nCheck --subject/--sessions/--betas (subject {opts.subject} has sessions 1-{n_all}) and --s3-endpoint.")
    if opts.captions == "coco":
        plan.items.append(P.PlanItem(P.COCO_ZIP_REL, -1, source="http", status="?",
                                     note="then captions_train2017.json + captions_val2017.json are extracted"))
    return plan, objects


def _etag_check(etag: str) -> str:
    e = (etag or "").strip('"')
    return "multipart ETag" if "-" in e else ("md5" if len(e) == 32 else "size only (opaque ETag)")


def _ranges_text(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def download_nsd(opts: NSDOptions, s3=None, http=None) -> RunReport:
    """Plan, print, check and fetch one subject (see the module doc). ``s3``/``http``: sources (tests)."""
    from .http import HTTPSource
    from .s3 import S3Source
    from .stimuli import fetch_subset, local_present, shown_image_ids
    from .terms import TERMS_TEXT, require_acceptance

    root = Path(opts.out)
    sessions = P.check_sessions(opts.subject, opts.sessions)
    opts.sessions = sessions
    if opts.betas not in ("nii.gz", "hdf5") or opts.stimuli not in ("subset", "full", "none") \
            or opts.captions not in ("coco", "none"):
        raise DownloadError(2, f"--betas nii.gz|hdf5, --stimuli subset|full|none, --captions coco|none; "
                               f"{opts.betas!r}, {opts.stimuli!r}, {opts.captions!r} were given")
    terms = None
    if not opts.dry_run:
        terms = require_acceptance(opts.accept_terms, opts.environ)
    manifest = _start(root, opts.dry_run)
    s3 = s3 or S3Source(endpoint_url=opts.s3_endpoint, jobs=opts.jobs)
    http = http or HTTPSource()
    plan, objects = plan_nsd(opts, s3, manifest)
    coco = next((it for it in plan.items if it.rel == P.COCO_ZIP_REL), None)
    coco_remote = None
    if coco is not None:
        try:
            coco_remote = http.head(opts.coco_url)
        except RemoteError as err:
            raise _remote_error(Remote(opts.coco_url, opts.coco_url, 0), root / P.COCO_ZIP_REL, err) from None
        coco.size, coco.remote = coco_remote.size, coco_remote
        coco.status = _status(root, manifest, P.COCO_ZIP_REL, coco_remote.size, item_etag(coco_remote))
    free = P.free_bytes(root)
    _say(plan.table(free))
    report = RunReport(plan)
    if opts.dry_run:
        _say(f"dry run: nothing was downloaded.\n{TERMS_TEXT}\n"
             "A real run needs --accept-nsd-terms (or BRAIN_DIFFUSER_ACCEPT_NSD_TERMS=1).")
        return report
    _say(f"{TERMS_TEXT}\nNSD terms accepted ({terms['by']}, {terms['accepted_at']}); recorded in the manifest.")
    P.check_space(plan, free=free)
    manifest.set_meta("nsd_terms", terms)

    progress = _Progress(plan.to_fetch(), opts.progress)
    try:
        def s3_runner(item: P.PlanItem) -> None:
            if item.status == "have":
                with progress.lock:
                    report.files_present += 1
                return
            _run_item(item, s3, _s3_remote_of(s3, objects[item.rel]), root, manifest, progress, opts.policy,
                      report)

        files = [it for it in plan.items if it.kind == "file" and it.source == "s3"]
        design = [it for it in files if it.rel == P.EXPDESIGN_KEY]
        _execute(design, s3_runner, 1)  # the subset needs the design first
        _execute([it for it in files if it.rel != P.EXPDESIGN_KEY], s3_runner, opts.jobs)
        if coco is not None:
            if coco.status == "have":
                report.files_present += 1
            else:
                _execute([coco], lambda it: _run_item(it, http, lambda: coco_remote, root, manifest, progress,
                                                      opts.policy, report), 1)
            _extract_captions(root, manifest)
        subset = next((it for it in plan.items if it.kind == "stimuli-subset"), None)
        if subset is not None:
            obj = objects[P.STIMULI_KEY]
            ids = shown_image_ids(root / P.EXPDESIGN_KEY, opts.subject, sessions)
            if subset.status == "have":
                report.files_present += 1
            else:
                manifest.forget(P.STIMULI_KEY)  # the file moves back to .part while it is extended
                remote = s3.remote(obj)
                bar, on_bytes = progress.file_bar(P.STIMULI_KEY, subset.size)
                try:
                    result = fetch_subset(s3, remote, root / P.STIMULI_KEY, ids, policy=opts.policy, jobs=opts.jobs,
                                          on_bytes=on_bytes)
                finally:
                    bar.close()
                present = local_present(root / P.STIMULI_KEY)
                manifest.record(P.STIMULI_KEY, {
                    "size": (root / P.STIMULI_KEY).stat().st_size, "sha256": sha256_file(root / P.STIMULI_KEY),
                    "source": remote.display, "source_etag": obj.etag, "etag": f"subset of {obj.etag}",
                    "kind": "stimuli-subset", "images_present": int(present.sum()) if present is not None else None,
                    "check": "size of every Range (the remote ETag covers the whole file)"})
                report.subset = result
                report.files_fetched += 1
    finally:
        progress.close()
    report.fetched_bytes = progress.fetched
    subjects = dict(manifest.doc.get("subjects", {}))
    subjects[str(opts.subject)] = {"sessions": sessions, "betas": opts.betas, "stimuli": opts.stimuli,
                                   "captions": opts.captions, "finished_at": utc_now(), "source": s3.name}
    manifest.set_meta("subjects", subjects)
    return report


def _s3_remote_of(s3, obj):
    """A callable giving the transfer's Remote: the planned object first, a fresh HEAD after a 412."""
    calls = {"n": 0}

    def remote_of() -> Remote:
        calls["n"] += 1
        return s3.remote(obj if calls["n"] == 1 else s3.head(obj.key))

    return remote_of


def _extract_captions(root: Path, manifest: Manifest) -> None:
    """captions_{train,val}2017.json out of the COCO annotations zip, next to it (atomically, recorded)."""
    zpath = root / P.COCO_ZIP_REL
    with zipfile.ZipFile(zpath) as z:
        names = set(z.namelist())
        for member in P.COCO_MEMBERS:
            rel = str(Path(P.COCO_ZIP_REL).parent / Path(member).name)
            if manifest.files.get(rel, {}).get("etag") == f"{manifest.files[P.COCO_ZIP_REL]['sha256']}:{member}" \
                    and manifest.is_current(rel, manifest.files[rel]["size"], manifest.files[rel]["etag"]):
                continue
            if member not in names:
                raise DownloadError(VERIFY_FAILED, f"{zpath}: has no {member}; is it COCO's "
                                                   "annotations_trainval2017.zip?")
            with atomic_path(root / rel) as tmp, z.open(member) as src, open(tmp, "wb") as dst:
                while data := src.read(1 << 20):
                    dst.write(data)
            manifest.record(rel, {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel),
                                  "source": f"{P.COCO_ZIP_REL}:{member}",
                                  "etag": f"{manifest.files[P.COCO_ZIP_REL]['sha256']}:{member}", "check": "zip CRC"})


# ------------------------------------------------------------------------------------------------ weights
def _select_vd(files) -> list:
    """The diffusers components of Versatile Diffusion; a .bin whose .safetensors twin exists is skipped."""
    chosen = [f for f in files if f.path == "model_index.json" or f.path.split("/", 1)[0] in VD_COMPONENTS]
    names = {f.path for f in chosen}
    return [f for f in chosen if not (f.path.endswith(".bin") and f.path[:-4] + ".safetensors" in names)]


def plan_weights(opts: WeightsOptions, http, manifest: Manifest) -> tuple[P.Plan, dict[str, Remote]]:
    from .http import hub_files, hub_resolve_url

    root = Path(opts.out)
    plan = P.Plan(root, [f"weights download plan: VDVAE ({opts.vdvae_url}) and {VD_REPO}@{opts.revision[:12]} "
                         f"(diffusers components only; pretrained_pth/ skipped)", f"to {root}"])
    remotes: dict[str, Remote] = {}
    try:
        vdvae = http.head(opts.vdvae_url, sha256=opts.vdvae_sha256)
        files = hub_files(opts.hf_endpoint, VD_REPO, opts.revision)
    except RemoteError as err:
        raise _remote_error(Remote("weights", "weights", 0), root, err) from None
    rel = f"vdvae/{VDVAE_NAME}"
    remotes[rel] = vdvae
    for f in _select_vd(files):
        url = hub_resolve_url(opts.hf_endpoint, VD_REPO, opts.revision, f.path)
        remotes[f"versatile-diffusion/{f.path}"] = Remote(display=url, key=url, size=f.size, sha256=f.sha256,
                                                          git_sha1=f.git_sha1, if_match=False)
    skipped = [f for f in files if f.path.startswith("pretrained_pth/")]
    if skipped:
        plan.warnings.append(f"skipped pretrained_pth/: {len(skipped)} files, "
                             f"{P.format_bytes(sum(f.size for f in skipped))} (not needed)")
    for rel, remote in remotes.items():
        plan.items.append(P.PlanItem(rel, remote.size, remote=remote, source="http",
                                     status=_status(root, manifest, rel, remote.size, item_etag(remote))))
    return plan, remotes


def download_weights(opts: WeightsOptions, http=None) -> RunReport:
    """Fetch the VDVAE checkpoint and Versatile Diffusion at a pinned revision; write ``models.json``."""
    from .http import HTTPSource

    root = Path(opts.out)
    manifest = _start(root, opts.dry_run)
    http = http or HTTPSource()
    plan, remotes = plan_weights(opts, http, manifest)
    free = P.free_bytes(root)
    _say(plan.table(free))
    report = RunReport(plan)
    if opts.dry_run:
        _say("dry run: nothing was downloaded")
        return report
    P.check_space(plan, free=free)
    progress = _Progress(plan.to_fetch(), opts.progress)

    def runner(item: P.PlanItem) -> None:
        if item.status == "have":
            with progress.lock:
                report.files_present += 1
            return
        _run_item(item, http, lambda: remotes[item.rel], root, manifest, progress, opts.policy, report)

    try:
        _execute(plan.items, runner, opts.jobs)
    finally:
        progress.close()
    report.fetched_bytes = progress.fetched
    vdvae_rel = f"vdvae/{VDVAE_NAME}"
    models = {
        "vdvae": {"path": str((root / vdvae_rel).resolve()), "sha256": manifest.files[vdvae_rel]["sha256"],
                  "source": opts.vdvae_url},
        "versatile_diffusion": {"path": str((root / "versatile-diffusion").resolve()), "hf_id": VD_REPO,
                                "revision": opts.revision},
    }
    atomic_write_json(root / "models.json", models)
    manifest.set_meta("weights", {"vd_repo": VD_REPO, "vd_revision": opts.revision, "vdvae_url": opts.vdvae_url,
                                  "finished_at": utc_now()})
    _say(f"wrote {root / 'models.json'} (pass it to `fit --models-json`)")
    return report

