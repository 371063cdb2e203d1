"""On-disk feature store keyed by NSD 73k image id (0-based).

A store is a folder with one entry per feature name (``vdvae``, ``clip_text``, ``clip_vision``, ...), each in
one of three layouts:

1. ``<name>.safetensors`` with tensors ``image_ids`` int64 (N,) and ``features`` float16/float32 (N, *shape).
2. a shard folder ``<name>/`` holding ``meta.json`` (``{"shape": [...], "dtype": "float16"}``) and
   ``shard-00000.safetensors``, ``shard-00001.safetensors``, ... (same two tensors each). Appendable and
   resumable: :class:`FeatureWriter` writes each shard atomically, so an interrupted extraction keeps every
   finished shard and :meth:`FeatureWriter.done_ids` says what to skip.
3. ``<name>.npy`` (N, *shape) with ``<name>_image_ids.npy`` (N,).

Reading (:class:`FeatureStore`) memory-maps: safetensors files are mapped through their header offsets (no
copy, only the requested rows are read), ``.npy`` through ``np.load(mmap_mode="r")``.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import atomic_path, atomic_write_json

__all__ = ["FeatureStore", "FeatureWriter", "write_features", "read_safetensors_memmap"]

_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "BF16": None}
_NP_TO_ST = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
_FEATURE_DTYPES = ("float16", "float32")
_SHARD_RE = re.compile(r"^shard-(\d{5})\.safetensors$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


# --------------------------------------------------------------------------------- safetensors (numpy)
def read_safetensors_memmap(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file as a read-only numpy array (no copy)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (hlen,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file (unreadable header: {err})") from None
    base = 8 + hlen
    size = path.stat().st_size
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError(f"{path}: tensor {key!r} has dtype {info['dtype']}; expected one of F16, F32, F64, I64, I32")
        start, stop = info["data_offsets"]
        shape = tuple(info["shape"])
        if base + stop > size or stop - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize:
            raise ValueError(f"{path}: tensor {key!r} is truncated or its header is inconsistent")
        if stop == start:
            out[key] = np.zeros(shape, dtype=dt)
        else:
            out[key] = np.memmap(path, dtype=dt, mode="r", offset=base + start, shape=shape)
    return out


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write numpy arrays as a safetensors file, atomically (same layout as ``safetensors.numpy``)."""
    header, offset, arrays = {}, 0, []
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        header[key] = {"dtype": _NP_TO_ST[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for a in arrays:
                f.write(a.tobytes())


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"'name' must be letters, digits, '_' or '-' (e.g. 'clip_text'); {name!r} was provided")
    return name


def _check_ids_feats(ids, feats, shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"'image_ids' must be a 1-D integer array; dtype {ids.dtype} shape {ids.shape} was provided")
    ids = ids.astype(np.int64)
    feats = np.asarray(feats)
    if feats.shape[:1] != ids.shape:
        raise ValueError(f"'features' must have {len(ids)} rows (one per image id); shape {feats.shape} was provided")
    if shape is not None and tuple(feats.shape[1:]) != tuple(shape):
        raise ValueError(f"'features' rows must have shape {tuple(shape)}; {tuple(feats.shape[1:])} was provided")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("'image_ids' contains duplicates")
    return ids, feats


def write_features(folder: str | os.PathLike, name: str, image_ids, features, *, dtype: str = "float16",
                   layout: str = "safetensors") -> Path:
    """Write one whole feature entry (``layout`` "safetensors" or "npy"); returns the written path."""
    _check_name(name)
    if dtype not in _FEATURE_DTYPES:
        raise ValueError(f"'dtype' must be one of {list(_FEATURE_DTYPES)}; {dtype!r} was provided")
    ids, feats = _check_ids_feats(image_ids, features, None)
    feats = feats.astype(dtype, copy=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "safetensors":
        path = folder / f"{name}.safetensors"
        _write_safetensors(path, {"image_ids": ids, "features": feats})
        return path
    if layout == "npy":
        with atomic_path(folder / f"{name}_image_ids.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, ids)
        path = folder / f"{name}.npy"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, feats)
        return path
    raise ValueError(f"'layout' must be one of ['safetensors', 'npy']; {layout!r} was provided")


# ------------------------------------------------------------------------------------------------ writer
class FeatureWriter:
    """Appendable, resumable writer of one feature as a shard folder ``<folder>/<name>/shard-NNNNN.safetensors``.

    ``shape`` is the per-image feature shape (e.g. ``(77, 768)``); ``dtype`` "float16" or "float32".
    Reopening an existing shard folder checks that shape and dtype agree.
    """

    def __init__(self, folder: str | os.PathLike, name: str, shape: Sequence[int], dtype: str = "float16"):
        self.name = _check_name(name)
        if dtype not in _FEATURE_DTYPES:
            raise ValueError(f"'dtype' must be one of {list(_FEATURE_DTYPES)}; {dtype!r} was provided")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.path = Path(folder) / name
        for other in (Path(folder) / f"{name}.safetensors", Path(folder) / f"{name}.npy"):
            if other.exists():
                raise ValueError(f"feature {name!r} already exists as {other}; cannot also write a shard folder")
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if tuple(meta["shape"]) != self.shape or meta["dtype"] != dtype:
                raise ValueError(
                    f"shard folder {self.path} holds shape {tuple(meta['shape'])} dtype {meta['dtype']}; "
                    f"the writer was asked for shape {self.shape} dtype {dtype}"
                )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta_path, {"shape": list(self.shape), "dtype": dtype})

    def _shards(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if _SHARD_RE.match(p.name))

    def done_ids(self) -> np.ndarray:
        """Sorted int64 image ids already written."""
        parts = [read_safetensors_memmap(p)["image_ids"] for p in self._shards()]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def append(self, image_ids, features) -> Path:
        """Write one shard for ``image_ids`` (k,) and ``features`` (k, *shape); ids must be new. Returns its path."""
        ids, feats = _check_ids_feats(image_ids, features, self.shape)
        dup = np.intersect1d(ids, self.done_ids())
        if len(dup):
            raise ValueError(f"image ids already written to {self.path}: {dup[:10].tolist()}"
                             + (f" and {len(dup) - 10} more" if len(dup) > 10 else ""))
        shards = self._shards()
        index = int(_SHARD_RE.match(shards[-1].name).group(1)) + 1 if shards else 0
        path = self.path / f"shard-{index:05d}.safetensors"
        _write_safetensors(path, {"image_ids": ids, "features": feats.astype(self.dtype, copy=False)})
        return path


# ------------------------------------------------------------------------------------------------ reader
class _Entry:
    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray]], source: Path):
        self.source = source
        self.parts = parts
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        self.part_of = np.concatenate([np.full(len(p[0]), k) for k, p in enumerate(parts)]) if parts else ids
        self.row_of = np.concatenate([np.arange(len(p[0])) for p in parts]) if parts else ids
        order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[order].astype(np.int64)
        self.order = order
        if len(self.sorted_ids) > 1 and (np.diff(self.sorted_ids) == 0).any():
            d = self.sorted_ids[1:][np.diff(self.sorted_ids) == 0]
            raise ValueError(f"feature entry {source} lists image ids more than once: {np.unique(d)[:10].tolist()}")


class FeatureStore:
    """Read features by 73k image id from a store folder (see the module docstring for the layouts)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"feature store folder {self.folder} does not exist")
        self._cache: dict[str, _Entry] = {}

    def names(self) -> list[str]:
        """Feature names present, sorted."""
        out = set()
        for p in self.folder.iterdir():
            if p.name.startswith("."):
                continue
            if p.is_file() and p.suffix == ".safetensors":
                out.add(p.stem)
            elif p.is_file() and p.suffix == ".npy" and not p.stem.endswith("_image_ids"):
                out.add(p.stem)
            elif p.is_dir() and (p / "meta.json").exists():
                out.add(p.name)
        return sorted(out)

    def _entry(self, name: str) -> _Entry:
        if name in self._cache:
            return self._cache[name]
        f = self.folder
        if (f / f"{name}.safetensors").exists():
            src = f / f"{name}.safetensors"
            parts = [self._st_part(src)]
        elif (f / name / "meta.json").exists():
            src = f / name
            parts = [self._st_part(p) for p in sorted(src.iterdir()) if _SHARD_RE.match(p.name)]
            meta = json.loads((src / "meta.json").read_text())
            for ids, feats in parts:
                if tuple(feats.shape[1:]) != tuple(meta["shape"]):
                    raise ValueError(f"a shard in {src} has rows of shape {feats.shape[1:]}; meta.json says {meta['shape']}")
            if not parts:
                parts = [(np.zeros(0, np.int64), np.zeros((0, *meta["shape"]), dtype=meta["dtype"]))]
        elif (f / f"{name}.npy").exists():
            src = f / f"{name}.npy"
            idp = f / f"{name}_image_ids.npy"
            if not idp.exists():
                raise FileNotFoundError(f"{src} needs its image ids in {idp}, which does not exist")
            feats, ids = np.load(src, mmap_mode="r"), np.load(idp)
            if ids.ndim != 1 or len(ids) != len(feats):
                raise ValueError(f"{idp} must hold {len(feats)} ids (one per row of {src}); shape {ids.shape} was found")
            parts = [(ids.astype(np.int64), feats)]
        else:
            raise KeyError(
                f"feature {name!r} is not in the store {self.folder}; it holds {self.names()}"
            )
        entry = _Entry(parts, src)
        self._cache[name] = entry
        return entry

    @staticmethod
    def _st_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
        t = read_safetensors_memmap(path)
        if "image_ids" not in t or "features" not in t:
            raise ValueError(f"{path} must hold tensors 'image_ids' and 'features'; it holds {sorted(t)}")
        ids, feats = np.asarray(t["image_ids"]), t["features"]
        if ids.ndim != 1 or len(ids) != len(feats):
            raise ValueError(f"{path}: 'image_ids' must have {len(feats)} entries; shape {ids.shape} was found")
        return ids, feats

    def shape(self, name: str) -> tuple[int, ...]:
        """Per-image feature shape, e.g. (91168,) or (77, 768)."""
        return tuple(self._entry(name).parts[0][1].shape[1:])

    def ids(self, name: str) -> np.ndarray:
        """Sorted int64 image ids available for ``name``."""
        return self._entry(name).sorted_ids.copy()

    def get(self, name: str, image_ids, columns: slice | None = None) -> np.ndarray:
        """float32 array (len(image_ids), *shape), rows in the order of ``image_ids``.

        ``columns``: a slice of the flattened feature (e.g. ``slice(0, 4096)``) to read only those values:
        returns (len(image_ids), n_columns). Memory-mapped entries then read only those bytes, so a fit can
        stream a 197,376-wide feature in column batches.
        """
        e = self._entry(name)
        want = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(e.sorted_ids, want)
        pos_c = np.minimum(pos, max(len(e.sorted_ids) - 1, 0))
        found = (len(e.sorted_ids) > 0) & (e.sorted_ids[pos_c] == want) if len(e.sorted_ids) else np.zeros(len(want), bool)
        if not found.all():
            miss = np.unique(want[~found])
            raise KeyError(
                f"feature {name!r} in {e.source} lacks {len(miss)} requested image ids: {miss[:10].tolist()}"
                + (" ..." if len(miss) > 10 else "")
            )
        flat = e.order[pos_c]
        part, row = e.part_of[flat], e.row_of[flat]
        shape = self.shape(name)
        if columns is None:
            out = np.empty((len(want), *shape), dtype=np.float32)
        else:
            if not isinstance(columns, slice) or columns.step not in (None, 1):
                raise ValueError(f"'columns' must be a slice with step 1; {columns!r} was provided")
            width = len(range(*columns.indices(int(np.prod(shape)))))
            out = np.empty((len(want), width), dtype=np.float32)
        for k, (_, feats) in enumerate(e.parts):
            sel = np.nonzero(part == k)[0]
            if len(sel):
                rows = row[sel]
                srt = np.argsort(rows, kind="stable")  # read rows in file order
                if columns is None:
                    out[sel[srt]] = feats[rows[srt]]
                else:
                    out[sel[srt]] = feats.reshape(len(feats), -1)[rows[srt], columns]
        return out
