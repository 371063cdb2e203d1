"""Small file helpers shared by every writer: atomic writes and checksums.

Nothing half-written is ever left under a final name: writers produce ``<name>.tmp-<pid>`` next to the
target and rename it into place only once complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

__all__ = ["atomic_path", "atomic_dir", "atomic_write_json", "sha256_file", "state_mismatch"]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays, tuples and paths -> plain JSON values (mappings keyed by str; non-finite floats ->
    None; anything else -> its str)."""
    import math
    from collections.abc import Mapping

    import numpy as np

    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


def state_mismatch(found: Mapping[str, tuple], expected: Mapping[str, tuple], limit: int = 10) -> str | None:
    """How a checkpoint's parameters differ from a model's: None if the names and shapes agree.

    found, expected : parameter name -> shape (the file's; the model's). The text lists the first ``limit``
    missing keys, unexpected keys and shape mismatches ("name: file (a, b) vs model (c, d)"), each with its
    count, for error messages that say what was found and what was expected.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return None

    def part(name, items):
        more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
        return f"{len(items)} {name}: {items[:limit]}{more}"

    return f"{part('missing keys', missing)}; {part('unexpected keys', unexpected)}; {part('shape mismatches', wrong)}"
