"""Memory and upload limits for a server shared by many sessions (a lab meeting: 15-30 browsers for an hour).

* :class:`ByteLRU`: a dict-like cache bounded in **bytes** (and optionally items), evicting the least recently
  used entries first. Pages keep their per-session results in one (reconstructions hold several 512 px images).
* :class:`BytePool`: one byte budget shared by many :class:`ByteLRU` caches (every session's), so the server's
  total stays bounded however many sessions are open: past it, the oldest entries of any session go first.
* :func:`nbytes_of`: the bytes an object holds (NumPy arrays, bytes, containers, dataclasses).
* :class:`UploadGate`: per-session upload rules: a size limit and a rate limit (a flood of uploads from one
  session is refused with a message; other sessions have their own gate).

Defaults (overridable by environment, in MiB (:func:`env_mib`) or counts (:func:`env_number`)): :data:`SESSION_CACHE_ENV`, :data:`SERVER_CACHE_ENV`,
:data:`UPLOAD_MB_ENV`, :data:`UPLOADS_PER_MINUTE_ENV`. Thread-safe: Streamlit runs each session's script in its
own thread.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator

import numpy as np

MiB = 2**20
SESSION_CACHE_ENV = "BRAIN_DIFFUSER_SESSION_CACHE_MB"
SERVER_CACHE_ENV = "BRAIN_DIFFUSER_SERVER_CACHE_MB"
UPLOAD_MB_ENV = "BRAIN_DIFFUSER_UPLOAD_MB"
UPLOADS_PER_MINUTE_ENV = "BRAIN_DIFFUSER_UPLOADS_PER_MINUTE"
#: per-session result caches: about 80 browse reconstructions (1.6 MB each at 512 px) or 20 ROI scene sets
DEFAULT_SESSION_CACHE_MB = 128
#: every session's caches together (30 students at 128 MiB would be 3.8 GiB)
DEFAULT_SERVER_CACHE_MB = 1024
#: largest upload (a float64 func1pt8mm NIfTI volume is about 6 MB, an NSD voxel vector 126 KB)
DEFAULT_UPLOAD_MB = 16
DEFAULT_UPLOADS_PER_MINUTE = 10
_TICK = itertools.count()  # recency stamps shared by every cache (a pool compares them across caches)


def env_number(name: str, default: int) -> int:
    """A whole number >= 1 from ``$name``, else ``default``; ValueError naming the variable when malformed."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"${name} must be a whole number >= 1; {text!r} was provided")
    return n


def env_mib(name: str, default_mib: float) -> int:
    """Bytes from ``$name`` given in MiB (a positive decimal, e.g. "128" or "0.5"), else ``default_mib`` MiB;
    ValueError naming the variable when malformed."""
    text = os.environ.get(name, "").strip()
    try:
        mib = float(text) if text else float(default_mib)
    except ValueError:
        mib = 0.0
    if not mib > 0 or mib != mib or mib == float("inf"):
        raise ValueError(f"${name} must be a positive number of MiB; {text!r} was provided")
    return max(1, int(mib * MiB))


def nbytes_of(obj: Any, _seen: set | None = None) -> int:
    """Bytes held by ``obj``: NumPy arrays by ``nbytes``, bytes-likes by length, dicts/lists/tuples/sets and
    dataclasses by their contents (each object counted once), anything else by ``sys.getsizeof``."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj)
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(nbytes_of(k, seen) + nbytes_of(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sys.getsizeof(obj) + sum(nbytes_of(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sys.getsizeof(obj) + sum(nbytes_of(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return sys.getsizeof(obj)


class BytePool:
    """A byte budget shared by many :class:`ByteLRU` caches: when their total passes ``max_bytes``, the least
    recently used entries across all of them are evicted. Caches hold the pool; the pool holds them weakly
    (a closed session's cache goes with its session state)."""

    def __init__(self, max_bytes: int):
        if not max_bytes > 0:
            raise ValueError(f"'max_bytes' must be a positive number of bytes; {max_bytes!r} was provided")
        self.max_bytes = int(max_bytes)
        self.lock = threading.RLock()  # one lock for the pool and its caches: eviction crosses caches
        self._caches: weakref.WeakSet = weakref.WeakSet()

    def register(self, cache: "ByteLRU") -> None:
        with self.lock:
            self._caches.add(cache)

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(c._nbytes for c in list(self._caches))

    def enforce(self) -> None:
        """Evict the globally oldest entries until the total fits (call with :attr:`lock` held)."""
        caches = [c for c in list(self._caches) if c._entries]
        total = sum(c._nbytes for c in caches)
        while total > self.max_bytes and caches:
            oldest = min(caches, key=lambda c: next(iter(c._entries.values()))[2])
            total -= oldest._evict_oldest()
            caches = [c for c in caches if c._entries]


class ByteLRU:
    """A mapping bounded in bytes (and optionally entries); least recently used entries are evicted first.

    max_bytes : the most bytes its values may hold together (:func:`nbytes_of`); a single value larger than
        that is not kept (``store`` returns False; the caller still has it for this run).
    max_items : optional bound on the number of entries.
    pool : optional :class:`BytePool` whose shared budget also applies.
    sizer : bytes of a value (default :func:`nbytes_of`).

    Reading an entry (``get``, ``[]``) makes it the most recent; ``in``, ``keys()``, ``values()``, ``items()``
    and iteration do not. Attributes ``evictions`` (count) and ``nbytes``.
    """

    def __init__(self, max_bytes: int, *, max_items: int | None = None, pool: BytePool | None = None,
                 sizer: Callable[[Any], int] = nbytes_of):
        if not max_bytes > 0:
            raise ValueError(f"'max_bytes' must be a positive number of bytes; {max_bytes!r} was provided")
        if max_items is not None and max_items < 1:
            raise ValueError(f"'max_items' must be >= 1 or None; {max_items!r} was provided")
        self.max_bytes, self.max_items, self.pool, self._sizer = int(max_bytes), max_items, pool, sizer
        self._lock = pool.lock if pool is not None else threading.RLock()
        self._entries: OrderedDict[Hashable, tuple[Any, int, int]] = OrderedDict()  # key -> (value, bytes, tick)
        self._nbytes = 0
        self.evictions = 0
        if pool is not None:
            pool.register(self)

    # ------------------------------------------------------------------ writing
    def store(self, key: Hashable, value: Any) -> bool:
        """Keep ``value`` under ``key`` as the most recent entry, evicting older ones to fit; False if it is
        larger than ``max_bytes`` on its own (then it is not kept, and an older entry of ``key`` is dropped)."""
        size = int(self._sizer(value))
        with self._lock:
            self._drop(key)
            if size > self.max_bytes or (self.pool is not None and size > self.pool.max_bytes):
                return False
            self._entries[key] = (value, size, next(_TICK))
            self._nbytes += size
            while self._nbytes > self.max_bytes or (self.max_items is not None and len(self._entries) > self.max_items):
                self._evict_oldest()
            if self.pool is not None:
                self.pool.enforce()
            return True

    __setitem__ = store

    def _drop(self, key: Hashable) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._nbytes -= old[1]

    def _evict_oldest(self) -> int:
        _, (_, size, _) = self._entries.popitem(last=False)
        self._nbytes -= size
        self.evictions += 1
        return size

    def pop(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            self._drop(key)
            return default if entry is None else entry[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    # ------------------------------------------------------------------ reading
    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return default
            self._entries[key] = (entry[0], entry[1], next(_TICK))
            self._entries.move_to_end(key)
            return entry[0]

    def __getitem__(self, key: Hashable) -> Any:
        with self._lock:
            if key not in self._entries:
                raise KeyError(key)
            return self.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Hashable]:
        with self._lock:
            return iter(list(self._entries))

    def keys(self) -> list:
        with self._lock:
            return list(self._entries)

    def values(self) -> list:
        with self._lock:
            return [v for v, _, _ in self._entries.values()]

    def items(self) -> list:
        with self._lock:
            return [(k, v) for k, (v, _, _) in self._entries.items()]

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __repr__(self) -> str:
        return (f"ByteLRU({len(self)} entries, {self._nbytes / MiB:.1f} of {self.max_bytes / MiB:.0f} MiB, "
                f"{self.evictions} evicted)")


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


class UploadRefused(ValueError):
    """An upload this server does not take (too large, or too many from one session too fast)."""


class UploadGate:
    """Per-session upload rules: at most ``max_bytes`` per file and ``max_uploads`` new files per ``window_s``.

    ``check(file_id, name, size)`` raises :class:`UploadRefused` with the rule and what was found. A file already
    accepted (same ``file_id``: Streamlit reruns the page with the same upload) passes again without counting;
    every new attempt counts, refused ones too, so a flood stays refused until it slows down.
    """

    def __init__(self, max_bytes: int, max_uploads: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.max_uploads, self.window_s, self._clock = int(max_bytes), int(max_uploads), window_s, clock
        self._times: list[float] = []
        self._accepted: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, file_id: str, name: str, size: int) -> None:
        with self._lock:
            if file_id in self._accepted:
                return
            now = self._clock()
            self._times = [t for t in self._times if now - t < self.window_s]
            self._times.append(now)
            if len(self._times) > self.max_uploads:
                wait = self.window_s - (now - self._times[-self.max_uploads - 1])
                raise UploadRefused(
                    f"{name}: too many uploads from this browser ({len(self._times)} in the last {self.window_s:.0f} s; "
                    f"this server takes at most {self.max_uploads} per {self.window_s:.0f} s). Wait {max(wait, 1):.0f} s "
                    "and upload again.")
            if size > self.max_bytes:
                raise UploadRefused(f"{name}: uploads on this server must be at most {_size(self.max_bytes)}; "
                                    f"this file is {_size(size)}")
            self._accepted[file_id] = None
            while len(self._accepted) > 64:  # remember recent accepted ids only
                self._accepted.popitem(last=False)
