"""Only the images a subject saw: exact Range reads from the remote ``nsd_stimuli.hdf5`` into a local file
of the same shape with a ``present`` mask.

The remote HDF5 is opened through :class:`RangeFile` (64 KiB blocks, a small cache) only to read its metadata:
contiguous storage gives ``dataset.id.get_offset()`` (image i at offset + i x image bytes); chunked storage
with one uncompressed image per chunk gives each chunk's offset. The pixels are then fetched with exact Range
GETs, merged where images are adjacent (up to 32 MiB a request). Large read-ahead caches (s3fs: 50 MiB) pull
nearly the whole 39.6 GB file on this sparse pattern. Other layouts (compressed chunks) fall back to reading
each image through h5py on the RangeFile.

The local file holds ``imgBrick`` (73000, S, S, 3) uint8 with chunks (1, S, S, 3), so images not fetched cost
no disk and read as zeros, and ``present`` (73000,) bool: the reader (:meth:`brain_diffuser_core.nsd.Subject.image`)
refuses ids whose flag is False. Work in progress is ``<dest>.part`` (resumed image by image).
"""
from __future__ import annotations

import io
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import TRANSFER_FAILED, DownloadError
from .transfer import Policy, Remote, Source, part_paths, read_range

__all__ = ["RangeFile", "shown_image_ids", "fetch_subset", "SubsetResult", "MAX_MERGE_BYTES"]

MAX_MERGE_BYTES = 32 << 20  #: largest merged Range request
BLOCK_BYTES = 64 << 10  #: RangeFile block (metadata reads)
_WRITE_BATCH = 32  #: images written between flushes of the local file


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over a remote object: reads whole ``block`` byte blocks by Range (LRU cache
    of ``cache_blocks``). ``counter(n)`` is told every byte fetched."""

    def __init__(self, source: Source, remote: Remote, *, block: int = BLOCK_BYTES, cache_blocks: int = 32,
                 policy: Policy | None = None, counter: Callable[[int], None] | None = None):
        super().__init__()
        self.source, self.remote, self.block, self.policy = source, remote, int(block), policy
        self.counter = counter
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_blocks = cache_blocks
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.remote.size}[whence]
        self._pos = max(0, base + int(offset))
        return self._pos

    def _block(self, index: int) -> bytes:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        start = index * self.block
        end = min(self.remote.size, start + self.block) - 1
        data = read_range(self.source, self.remote, start, end, self.policy, self.counter)
        self._cache[index] = data
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return data

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), max(0, self.remote.size - self._pos))
        done = 0
        while done < n:
            index, within = divmod(self._pos, self.block)
            data = self._block(index)[within: within + n - done]
            view[done: done + len(data)] = data
            done += len(data)
            self._pos += len(data)
        return done


def shown_image_ids(expdesign_path: Path, subject: int, sessions) -> np.ndarray:
    """Sorted unique 0-based 73k ids the subject saw in ``sessions``:
    ``subjectim[s-1, masterordering[t]-1] - 1`` over the sessions' trials."""
    from ..nsd import _read_expdesign, _trial_design

    _, image_ids, _ = _trial_design(_read_expdesign(Path(expdesign_path)), int(subject), list(sessions))
    return np.unique(image_ids)


@dataclass
class SubsetResult:
    n_images: int  # ids asked for
    fetched_images: int  # fetched in this run
    data_bytes: int  # pixel bytes fetched
    metadata_bytes: int  # bytes read to parse the remote HDF5
    image_bytes: int  # one image
    requests: int  # pixel Range requests
    shape: tuple


def _layout(source, remote, policy, counter, ids):
    """(shape, {id: byte offset or None (unallocated: zeros)} or None when pixels must go through h5py)."""
    import h5py

    rf = RangeFile(source, remote, policy=policy, counter=counter)
    try:
        f = h5py.File(rf, "r")
    except OSError as err:
        raise DownloadError(TRANSFER_FAILED, f"{remote.display}: not a readable HDF5 file through Range reads "
                                             f"({err}); is this the NSD stimuli file?") from None
    with f:
        if "imgBrick" not in f:
            raise DownloadError(TRANSFER_FAILED, f"{remote.display}: no dataset 'imgBrick' (found {sorted(f)})")
        d = f["imgBrick"]
        shape = tuple(int(s) for s in d.shape)
        if len(shape) != 4 or shape[3] != 3 or d.dtype != np.uint8:
            raise DownloadError(TRANSFER_FAILED, f"{remote.display}: 'imgBrick' must be uint8 (N, S, S, 3); "
                                                 f"found {d.dtype} {shape}")
        image_bytes = int(np.prod(shape[1:]))
        plist = d.id.get_create_plist()
        layout = plist.get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            base = d.id.get_offset()
            return shape, {int(i): (None if base is None else int(base) + int(i) * image_bytes) for i in ids}, rf
        if layout == h5py.h5d.CHUNKED and d.chunks == (1,) + shape[1:] and plist.get_nfilters() == 0:
            offsets = {}
            for i in ids:
                info = d.id.get_chunk_info_by_coord((int(i), 0, 0, 0))
                offsets[int(i)] = None if info.byte_offset is None else int(info.byte_offset)
            return shape, offsets, rf
        return shape, None, rf


def _ranges(offsets: dict[int, int], image_bytes: int, max_bytes: int) -> list[tuple[int, int, list[int]]]:
    """[(start, end inclusive, ids)]: adjacent images merged into one request up to ``max_bytes``."""
    out: list[tuple[int, int, list[int]]] = []
    for i, off in sorted(offsets.items(), key=lambda kv: kv[1]):
        if out and out[-1][1] + 1 == off and (off + image_bytes - out[-1][0]) <= max_bytes:
            start, _, group = out[-1]
            out[-1] = (start, off + image_bytes - 1, group + [i])
        else:
            out.append((off, off + image_bytes - 1, [i]))
    return out


def _open_local(part: Path, shape: tuple, remote: Remote):
    """The local .part HDF5, created or reopened (a version from another remote, or unreadable: new)."""
    import h5py

    if part.exists():
        try:
            f = h5py.File(part, "r+")
            ok = (f.attrs.get("source_etag") == (remote.etag or "") and int(f.attrs.get("source_size", -1)) == remote.size
                  and "imgBrick" in f and tuple(f["imgBrick"].shape) == shape and "present" in f)
            if ok:
                return f
            f.close()
        except OSError:
            pass
        part.unlink()
    f = h5py.File(part, "w")
    f.create_dataset("imgBrick", shape=shape, dtype=np.uint8, chunks=(1,) + shape[1:])
    f.create_dataset("present", shape=(shape[0],), dtype=bool)  # all False
    f.attrs["source"] = remote.display
    f.attrs["source_etag"] = remote.etag or ""
    f.attrs["source_size"] = remote.size
    return f


def local_present(path: Path) -> np.ndarray | None:
    """The ``present`` mask of a local stimuli file (None: a full copy without a mask, or unreadable)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f["present"][:], dtype=bool) if "present" in f else None
    except (OSError, KeyError):
        return None


def fetch_subset(source: Source, remote: Remote, dest: Path, ids, *, policy: Policy | None = None, jobs: int = 4,
                 on_bytes: Callable[[int], None] | None = None, max_merge_bytes: int = MAX_MERGE_BYTES) -> SubsetResult:
    """Write images ``ids`` (0-based 73k ids) of the remote ``imgBrick`` into ``dest`` (see the module doc).

    An existing ``dest`` from the same remote version is extended (it is moved back to ``.part`` first, so an
    interrupted extension never leaves a file under the final name that lacks images it claims).
    """
    dest = Path(dest)
    part, _ = part_paths(dest)
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    counts = {"meta": 0, "data": 0}

    def meta_counter(n: int) -> None:
        counts["meta"] += n
        if on_bytes:
            on_bytes(n)

    def data_counter(n: int) -> None:
        counts["data"] += n
        if on_bytes:
            on_bytes(n)

    shape, offsets, rf = _layout(source, remote, policy, meta_counter, ids)
    if ids.size and (ids.min() < 0 or ids.max() >= shape[0]):
        raise DownloadError(TRANSFER_FAILED, f"{remote.display}: 'imgBrick' holds {shape[0]} images; ids up to "
                                             f"{int(ids.max())} were asked for")
    image_bytes = int(np.prod(shape[1:]))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not part.exists():
        os.replace(dest, part)
    f = _open_local(part, shape, remote)
    requests = 0
    try:
        present = np.asarray(f["present"][:], dtype=bool)
        todo = [int(i) for i in ids if not present[i]]
        out, flags = f["imgBrick"], f["present"]
        if offsets is None:  # compressed or other chunking: one image at a time through h5py
            import h5py

            with h5py.File(rf, "r") as remote_h5:
                for n, i in enumerate(todo, 1):
                    before = counts["meta"]
                    out[i] = remote_h5["imgBrick"][i]
                    counts["data"] += counts["meta"] - before
                    counts["meta"] = before
                    flags[i] = True
                    requests += 1
                    if n % _WRITE_BATCH == 0:
                        f.flush()
        else:
            zeros = [i for i in todo if offsets[i] is None]  # unallocated remotely: the file reads zeros there
            for i in zeros:
                flags[i] = True
            groups = _ranges({i: offsets[i] for i in todo if offsets[i] is not None}, image_bytes, max_merge_bytes)
            written = 0

            def get(group):
                start, end, group_ids = group
                return group_ids, read_range(source, remote, start, end, policy, data_counter)

            with ThreadPoolExecutor(max_workers=max(1, int(jobs))) as pool:
                for group_ids, data in pool.map(get, groups):  # written here, in order: h5py is not thread-safe
                    pixels = np.frombuffer(data, dtype=np.uint8).reshape((len(group_ids),) + shape[1:])
                    for k, i in enumerate(group_ids):
                        out[i] = pixels[k]
                        flags[i] = True
                    requests += 1
                    written += len(group_ids)
                    if written >= _WRITE_BATCH:
                        f.flush()
                        written = 0
        f.flush()
    finally:
        f.close()
    with open(part, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(part, dest)
    return SubsetResult(int(ids.size), len(todo), counts["data"], counts["meta"], image_bytes, requests, shape)
