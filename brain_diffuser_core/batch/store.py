"""Where a batch job's outputs live, and how a shard becomes done: atomically, checked, never half.

Folder layout (``out/``)::

    batch.json                 the job: kind, settings, their fingerprint, the plan's size (written first)
    <item files>               whatever the job writes per item, e.g. images/faces/average/000_final.png
    shards/shard-00003.json    a shard's record: its items, each file's sha256 and size, each item's row
    index.json, index.csv      every finished item's row (written at the end of each run)

A shard is done when its record exists, parses, carries the job's fingerprint, lists exactly the planned
items, and every file it lists exists with the recorded size and sha256. Files are written to a unique temp
name in the same folder, fsynced and renamed (``os.replace``); the record is written the same way, last. So a
file planted or left truncated under a final name is never taken as done, and a killed run leaves only whole
shards behind. Several processes (Ray workers, SLURM array tasks) may commit shards into one folder at once:
they never write the same temp name, and a shard computed twice writes identical bytes (per-item seeds).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io import sha256_file, to_jsonable
from .plan import Shard, fingerprint, items_digest

__all__ = ["BatchError", "BatchSettingsError", "BatchDiskFullError", "ItemOutput", "ShardStore",
           "MANIFEST_NAME", "FORMAT"]

FORMAT = "brain-diffuser-explorer/batch"
VERSION = 1
MANIFEST_NAME = "batch.json"


class BatchError(RuntimeError):
    """A batch job could not finish; finished shards are kept and a rerun resumes."""


class BatchSettingsError(BatchError, ValueError):
    """The output folder holds a job with other settings: refused rather than mixed in."""


class BatchDiskFullError(BatchError, OSError):
    """The output folder's filesystem is full (or over quota)."""


class ItemOutput:
    """What one item produced: ``files`` {path relative to the output folder: bytes}, ``row`` (JSON values
    for the index: seed, scores, timings...) and ``arrays`` (kept in memory for a job that writes one file per
    shard, e.g. features: see ``Job.shard_files``)."""

    __slots__ = ("key", "files", "row", "arrays")

    def __init__(self, key: str, files: Mapping[str, bytes] | None = None, row: Mapping[str, Any] | None = None,
                 arrays: Mapping[str, Any] | None = None):
        self.key = key
        self.files = dict(files or {})
        self.row = dict(row or {})
        self.arrays = dict(arrays or {})


def _check_relpath(rel: str) -> str:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or rel.startswith(".") or p.parts[0] == "shards" \
            or rel in (MANIFEST_NAME, "index.json", "index.csv"):
        raise ValueError(f"an item's file must be a relative path inside the output folder, not hidden and not "
                         f"a batch file; {rel!r} was produced")
    return rel


class ShardStore:
    """The output folder of one job: opens (or creates) ``batch.json`` and refuses other settings.

    kind : the job's name ("sweep", "reconstruct", ...); settings : JSON values that decide the outputs (the
    fingerprint covers kind + settings); n_items, shard_size : the plan's size (informative).
    Picklable: Ray workers get a copy and commit shards themselves (the folder must be shared with them).
    """

    def __init__(self, out: str | os.PathLike, kind: str, settings: Mapping[str, Any], *, n_items: int = 0,
                 shard_size: int = 1, create: bool = True):
        self.out = Path(out).resolve()  # workers elsewhere (Ray, SLURM) see the same absolute path
        self.kind = str(kind)
        self.settings = to_jsonable(dict(settings))
        self.fingerprint = fingerprint({"kind": self.kind, "settings": self.settings})
        if create:
            self._open(n_items, shard_size)

    # ------------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST_NAME

    def _open(self, n_items: int, shard_size: int) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._os_error(err, self.out) from None
        existing = read_manifest(self.out)
        if existing is not None and existing.get("fingerprint") != self.fingerprint \
                and not any((self.out / "shards").glob("shard-*.json")):
            existing = None  # nothing was finished under the old settings (e.g. refused at start): start afresh
        if existing is None:
            write_bytes(self.manifest_path, (json.dumps(
                {"format": FORMAT, "version": VERSION, "kind": self.kind, "fingerprint": self.fingerprint,
                 "settings": self.settings, "n_items": int(n_items), "shard_size": int(shard_size)},
                indent=2, sort_keys=True) + "\n").encode())
            return
        if existing.get("kind") != self.kind or existing.get("fingerprint") != self.fingerprint:
            old = existing.get("settings") or {}
            changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            detail = "; ".join(f"{k}: {old.get(k)!r} there, {self.settings.get(k)!r} now" for k in changed[:6])
            raise BatchSettingsError(
                f"output folder {self.out} holds a {existing.get('kind')!r} job with other settings "
                f"({detail or 'another job kind'}); its finished results are kept untouched. Rerun with the "
                f"same settings to resume it, or choose another --out folder")

    # ------------------------------------------------------------------ shards
    def record_path(self, shard: Shard) -> Path:
        return self.out / "shards" / f"{shard.name}.json"

    def done_record(self, shard: Shard) -> dict | None:
        """The shard's record when the shard is completely and correctly done, else None (see module doc)."""
        path = self.record_path(shard)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # missing, unreadable or truncated: not done
        if not isinstance(record, dict) or record.get("fingerprint") != self.fingerprint \
                or record.get("items_digest") != items_digest(shard.items):
            return None
        listed = [record.get("files", {})] + [item.get("files", {}) for item in record.get("items", [])]
        for files in listed:
            for rel, meta in files.items():
                f = self.out / rel
                try:
                    if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
                        return None
                except (OSError, KeyError, TypeError, AttributeError):
                    return None
        return record

    def commit(self, shard: Shard, outputs: Sequence[ItemOutput], worker: Mapping[str, Any] | None = None,
               seconds: float | None = None, shard_files: Mapping[str, bytes] | None = None) -> dict:
        """Write every item's files and the shard's own ``shard_files``, then the shard's record (each
        atomically); returns the record."""
        import hashlib

        keys = [o.key for o in outputs]
        if keys != shard.keys:
            raise ValueError(f"{shard.name}: outputs must come one per planned item, in order; planned "
                             f"{shard.keys[:3]}..., got {keys[:3]}...")
        items = []
        for item, o in zip(shard.items, outputs):
            files = {}
            for rel, data in o.files.items():
                write_bytes(self.out / _check_relpath(rel), data)
                files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            items.append({"key": item.key, "params": to_jsonable(dict(item.params)), "files": files,
                          "row": to_jsonable(o.row)})
        own = {}
        for rel, data in (shard_files or {}).items():
            write_bytes(self.out / _check_relpath(rel), data)
            own[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        record = {"fingerprint": self.fingerprint, "shard": shard.index, "items_digest": items_digest(shard.items),
                  "items": items, "files": own, "worker": to_jsonable(dict(worker or {})), "seconds": seconds}
        write_bytes(self.record_path(shard), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        return record

    # ------------------------------------------------------------------ index
    def write_index(self, records: Sequence[Mapping[str, Any]], *, complete: bool) -> list[dict]:
        """Write ``index.json`` and ``index.csv`` (one row per finished item, in plan order); returns the rows."""
        import csv
        import io

        rows = [item_row(item) for rec in sorted(records, key=lambda r: r["shard"]) for item in rec["items"]]
        columns = list(dict.fromkeys(c for r in rows for c in r))
        write_bytes(self.out / "index.json", (json.dumps(
            {"format": FORMAT, "kind": self.kind, "fingerprint": self.fingerprint, "settings": self.settings,
             "complete": bool(complete), "columns": columns, "rows": rows}, indent=1) + "\n").encode())
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
        write_bytes(self.out / "index.csv", buf.getvalue().encode())
        return rows

    def _os_error(self, err: OSError, path: Path) -> Exception:
        return disk_error(err, path, self.out)


def file_kind(rel: str) -> str:
    """The part of a file name after its last "_" (``000_final.png`` -> final), or, for a name without one,
    its folder's name (``images/full/123.png`` -> full, as the ``evaluate`` layout has it)."""
    p = Path(rel)
    return p.stem.rsplit("_", 1)[-1] if "_" in p.stem or len(p.parts) < 2 else p.parent.name


def item_row(item: Mapping[str, Any]) -> dict:
    """A shard record's item -> its index row: "key", its params, its row values, and "file:<kind>" -> relative
    path for each file (<kind>: :func:`file_kind`)."""
    return {"key": item["key"], **item.get("params", {}), **item.get("row", {}),
            **{f"file:{file_kind(rel)}": rel for rel in item.get("files", {})}}


def read_manifest(out: str | os.PathLike) -> dict | None:
    """The folder's ``batch.json`` as a dict, None when absent; a broken one raises BatchError naming it."""
    path = Path(out) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BatchError(f"{path} is not a readable batch manifest ({err}); move the folder aside or use "
                         "another --out") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise BatchError(f"{path} must have \"format\": {FORMAT!r}; found {obj.get('format') if isinstance(obj, dict) else obj!r}")
    return obj


def disk_error(err: OSError, path: Path, out: Path) -> Exception:
    """ENOSPC/EDQUOT -> :class:`BatchDiskFullError` naming the folder and the fix; other errors unchanged."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return BatchDiskFullError(
            err.errno, f"the output folder {out} is full (no space left on its filesystem) while writing "
                       f"{path.name}; every shard finished before is kept. Free space (or choose --out on "
                       f"another disk with the same settings) and rerun to resume")
    return err


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: unique temp name beside it, fsync, ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        out = path.parent
        while out.parent != out and not (out / MANIFEST_NAME).exists():
            out = out.parent
        raise disk_error(err, path, out if (out / MANIFEST_NAME).exists() else path.parent) from None
