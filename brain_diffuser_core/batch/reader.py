"""A batch output folder (``sweep``, ``reconstruct``, ...) read back for looking at: rows, filters, pages.

Reads the shard records (the folder's truth, also while a run is still writing or after it died), falling back
to ``index.json``; a folder written by ``reconstruct`` before the batch layer (``manifest.json`` with
"images") is read too. Nothing is computed; no streamlit here (the app's pages call this).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .store import BatchError, item_row, read_manifest

__all__ = ["ResultsFolder", "open_results"]

#: image kinds in display order (files are indexed as "file:<kind>")
KINDS = ("original", "stage1", "final")


@dataclass
class ResultsFolder:
    """path; kind ("sweep", "reconstruct", ...); settings; complete (every planned shard finished); n_items
    (planned); rows: one dict per finished item ("key", its params and row values, "file:<kind>": relative
    path)."""

    path: Path
    kind: str
    settings: dict
    complete: bool
    n_items: int
    rows: list[dict]

    def kinds(self) -> list[str]:
        """Image kinds present (e.g. ["stage1", "final"]), in :data:`KINDS` order, others after."""
        found = {c[5:] for r in self.rows for c in r if c.startswith("file:")}
        return [k for k in KINDS if k in found] + sorted(found - set(KINDS))

    def values(self, column: str) -> list:
        """Distinct values of ``column`` in row order (e.g. the patterns or subjects of a sweep)."""
        return list(dict.fromkeys(r[column] for r in self.rows if column in r))

    def select(self, **equal: Any) -> list[dict]:
        """Rows whose columns equal the given values (None or "" = any)."""
        return [r for r in self.rows
                if all(v in (None, "") or str(r.get(k)) == str(v) for k, v in equal.items())]

    def image_path(self, row: dict, kind: str) -> Path | None:
        rel = row.get(f"file:{kind}")
        return None if rel is None else self.path / rel

    @staticmethod
    def page(rows: Sequence[dict], page: int, per_page: int) -> tuple[list[dict], int]:
        """Rows of 0-based ``page`` and the number of pages (at least 1)."""
        n_pages = max(1, math.ceil(len(rows) / max(1, per_page)))
        page = min(max(0, int(page)), n_pages - 1)
        return list(rows[page * per_page:(page + 1) * per_page]), n_pages


def open_results(folder: str | Path) -> ResultsFolder:
    """Read a results folder; ValueError naming the folder when it holds none."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"results folder {str(path)!r} does not exist (give the --out folder of a `sweep` or "
                         "`reconstruct` run)")
    try:
        manifest = read_manifest(path)
    except BatchError as err:
        raise ValueError(str(err)) from None
    if manifest is None:
        legacy = path / "manifest.json"
        if legacy.is_file():
            try:
                obj = json.loads(legacy.read_text())
                images = obj["images"]
                rows = [item_row({"key": k, "params": {"image_id": int(k)}, "row": {"seed": v.get("seed")},
                                  "files": dict.fromkeys(v.get("files", []))}) for k, v in images.items()]
                return ResultsFolder(path, "reconstruct", dict(obj.get("run", {})), True, len(rows), rows)
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
        raise ValueError(f"{path} holds no batch results (no batch.json; written by `sweep` or `reconstruct`)")
    records = []
    for p in sorted((path / "shards").glob("shard-*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue  # being written or truncated: not finished
        if isinstance(rec, dict) and rec.get("fingerprint") == manifest.get("fingerprint"):
            records.append(rec)
    rows = [item_row(item) for rec in sorted(records, key=lambda r: r.get("shard", 0))
            for item in rec.get("items", [])]
    n_items = int(manifest.get("n_items", len(rows)))
    return ResultsFolder(path, str(manifest.get("kind")), dict(manifest.get("settings", {})),
                         len(rows) >= n_items, n_items, rows)
