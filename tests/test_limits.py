"""brain_diffuser_core.limits: byte-bounded LRU caches, a server-wide pool, the per-session upload gate."""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

import numpy as np
import pytest

from brain_diffuser_core.limits import BytePool, ByteLRU, UploadGate, UploadRefused, env_number, nbytes_of


def _img(kb: int) -> np.ndarray:
    return np.zeros(kb * 1024, dtype=np.uint8)


@dataclass
class _Rec:
    final: np.ndarray
    features: dict = field(default_factory=dict)


def test_nbytes_of_counts_arrays_in_containers_and_dataclasses_once():
    a = _img(100)
    rec = _Rec(a, {"x": _img(50)})
    assert 150 * 1024 <= nbytes_of(rec) < 150 * 1024 + 2000
    assert nbytes_of([a, a, (a,)]) < 100 * 1024 + 500  # the same array is counted once
    assert nbytes_of(b"12345") == 5


def test_byte_lru_evicts_least_recently_used_by_bytes():
    c = ByteLRU(300 * 1024)
    for k in "abc":
        assert c.store(k, _img(100))
    assert c.keys() == ["a", "b", "c"]
    c.get("a")  # a is now the most recent
    c["d"] = _img(100)
    assert set(c.keys()) == {"a", "c", "d"} and c.evictions == 1
    assert c.nbytes <= 300 * 1024
    c["e"] = _img(250)  # 250 KB fits beside nothing else: a, c and d go
    assert c.keys() == ["e"] and c.nbytes == 250 * 1024
    assert not c.store("huge", _img(400))  # larger than the whole cache: not kept
    assert "huge" not in c and "e" in c
    assert c.pop("e") is not None and len(c) == 0 and c.nbytes == 0


def test_byte_lru_item_bound_and_replacing_a_key():
    c = ByteLRU(10 * 2**20, max_items=2)
    c["a"], c["b"], c["a"] = _img(1), _img(1), _img(2)
    assert c.keys() == ["b", "a"] and c.nbytes == 3 * 1024
    c["c"] = _img(1)
    assert c.keys() == ["a", "c"]
    with pytest.raises(KeyError):
        c["b"]
    with pytest.raises(ValueError, match="max_bytes"):
        ByteLRU(0)


def test_pool_bounds_all_sessions_together_evicting_the_oldest_anywhere():
    pool = BytePool(500 * 1024)
    s1, s2 = ByteLRU(400 * 1024, pool=pool), ByteLRU(400 * 1024, pool=pool)
    s1["a"] = _img(200)
    s2["b"] = _img(200)
    s1["c"] = _img(200)  # 600 KB in all: the oldest entry of any session (s1's a) goes
    assert s1.keys() == ["c"] and s2.keys() == ["b"] and pool.nbytes == 400 * 1024
    s1.get("c")
    s2["d"] = _img(200)  # now b is the oldest
    assert s2.keys() == ["d"] and s1.keys() == ["c"]
    del s1
    gc.collect()
    assert pool.nbytes == 200 * 1024  # a closed session's cache leaves the pool with it


def test_upload_gate_size_rate_and_reruns():
    now = [0.0]
    gate = UploadGate(max_bytes=1024, max_uploads=3, window_s=60, clock=lambda: now[0])
    with pytest.raises(UploadRefused, match=r"must be at most 1.0 KiB; this file is 2.0 KiB"):
        gate.check("big", "big.npy", 2048)
    gate.check("f1", "a.npy", 10)
    gate.check("f1", "a.npy", 10)  # the same upload on a rerun does not count again
    gate.check("f2", "b.npy", 10)
    with pytest.raises(UploadRefused, match=r"too many uploads from this browser .*Wait 60 s"):
        gate.check("f3", "c.npy", 10)  # 4th new attempt in a minute (the refused big one counted)
    gate.check("f1", "a.npy", 10)  # accepted files stay usable during the flood
    other = UploadGate(max_bytes=1024, max_uploads=3, window_s=60, clock=lambda: now[0])
    other.check("g1", "x.npy", 10)  # another session is not affected
    now[0] = 61.0
    gate.check("f4", "d.npy", 10)  # the flood has slowed: accepted again


def test_env_number(monkeypatch):
    monkeypatch.setenv("X_MB", "32")
    assert env_number("X_MB", 5) == 32
    monkeypatch.setenv("X_MB", "lots")
    with pytest.raises(ValueError, match=r"\$X_MB must be a whole number >= 1; 'lots'"):
        env_number("X_MB", 5)
    monkeypatch.delenv("X_MB")
    assert env_number("X_MB", 5) == 5
