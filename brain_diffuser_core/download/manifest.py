"""The download manifest: one entry per finished file (size, sha256, source, ETag), checkable offline.

``<ROOT>/download-manifest.json``::

    {"format": 1, "files": {"nsddata/.../nsd_expdesign.mat": {"size": 1234, "sha256": "...", "source":
     "s3://natural-scenes-dataset/nsddata/...", "etag": "\\"...\\"", "mtime_ns": ..., "fetched_at": "..."}, ...},
     "nsd_terms": {...}, "subjects": {"1": {...}}, "checksum": "<sha256 of the rest>"}

``checksum`` makes a hand-edited manifest visible: :func:`verify` refuses it, and a download run treats its
entries as unknown (files on disk are re-checked against the server, not re-fetched when they match).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_path, sha256_file

__all__ = ["MANIFEST_NAME", "Manifest", "VerifyReport", "verify", "utc_now"]

MANIFEST_NAME = "download-manifest.json"
_FORMAT = 1


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _checksum(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Manifest:
    """The manifest of one output folder; :meth:`record` saves after every finished file (thread-safe)."""

    def __init__(self, root: Path, doc: dict | None = None, problem: str | None = None):
        self.root = Path(root)
        self.doc = doc or {"format": _FORMAT, "files": {}}
        self.doc.setdefault("files", {})
        #: why the stored manifest was not trusted (None when it was fine or absent)
        self.problem = problem
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def files(self) -> dict[str, dict]:
        return self.doc["files"]

    @classmethod
    def load(cls, root) -> "Manifest":
        """Read ``root``'s manifest; a missing one is empty, an unreadable or hand-edited one is empty with
        :attr:`problem` saying why."""
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            return cls(root)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return cls(root, problem=f"{path} is not readable JSON ({err})")
        if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
            return cls(root, problem=f"{path} does not hold a 'files' table")
        if doc.get("checksum") != _checksum(doc):
            return cls(root, {k: v for k, v in doc.items() if k not in ("files", "checksum")},
                       problem=f"{path} was changed after it was written (its checksum does not match: edited by hand?)")
        return cls(root, doc)

    def save(self) -> None:
        self.doc["format"] = _FORMAT
        self.doc["checksum"] = _checksum(self.doc)
        with atomic_path(self.path) as tmp:
            with open(tmp, "w") as f:
                f.write(json.dumps(self.doc, indent=1, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def record(self, rel: str, entry: dict) -> None:
        """Add or replace the entry of ``rel`` (a path relative to the root) and save."""
        path = self.root / rel
        entry = dict(entry, mtime_ns=path.stat().st_mtime_ns, fetched_at=entry.get("fetched_at") or utc_now())
        with self._lock:
            self.files[rel] = entry
            self.save()

    def forget(self, rel: str) -> None:
        with self._lock:
            if self.files.pop(rel, None) is not None:
                self.save()

    def set_meta(self, key: str, value) -> None:
        with self._lock:
            self.doc[key] = value
            self.save()

    def is_current(self, rel: str, size: int, etag: str | None) -> bool:
        """True when ``rel`` was finished from the same remote version and is unchanged on disk (size and
        mtime: cheap enough for every re-run; :func:`verify` re-hashes)."""
        entry = self.files.get(rel)
        if not entry or entry.get("size") != size or (etag is not None and entry.get("etag") != etag):
            return False
        try:
            st = (self.root / rel).stat()
        except OSError:
            return False
        return st.st_size == size and st.st_mtime_ns == entry.get("mtime_ns")


@dataclass
class VerifyReport:
    root: Path
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # "path: why"
    incomplete: list[str] = field(default_factory=list)  # .part files of unfinished transfers
    problem: str | None = None  # the manifest itself

    @property
    def ok(self) -> bool:
        return self.problem is None and not self.missing and not self.changed

    def lines(self) -> list[str]:
        out = []
        if self.problem:
            out.append(f"manifest: {self.problem}")
        out += [f"missing: {p}" for p in self.missing]
        out += [f"changed: {p}" for p in self.changed]
        out += [f"unfinished transfer (a re-run of download resumes it): {p}" for p in self.incomplete]
        return out


def verify(root, progress=None) -> VerifyReport:
    """Check every manifest entry of ``root`` offline: present, same size, same sha256.

    ``progress(rel, done_bytes, total_bytes)`` is called after each file.
    """
    root = Path(root)
    report = VerifyReport(root)
    manifest = Manifest.load(root)
    if manifest.problem:
        report.problem = manifest.problem
        return report
    if not manifest.path.is_file():
        report.problem = (f"{manifest.path} not found: {root} was not written by `python -m brain_diffuser_core "
                          "download` (or the manifest was removed); run download nsd/weights with --out on it")
        return report
    total = sum(int(e.get("size", 0)) for e in manifest.files.values())
    done = 0
    for rel, entry in sorted(manifest.files.items()):
        path = root / rel
        report.checked += 1
        if not path.is_file():
            report.missing.append(rel)
        elif path.stat().st_size != entry.get("size"):
            report.changed.append(f"{rel}: size {path.stat().st_size} B, manifest says {entry.get('size')} B")
        elif sha256_file(path) != entry.get("sha256"):
            report.changed.append(f"{rel}: sha256 differs from the manifest (the file changed on disk)")
        done += int(entry.get("size", 0))
        if progress:
            progress(rel, done, total)
    report.incomplete = sorted(str(p.relative_to(root)) for p in root.rglob("*.part"))
    return report
