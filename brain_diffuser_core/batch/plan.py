"""A deterministic plan of shards: the same items and shard size always make the same shards.

Items are the unit of work (a 73k image id, a test row, a (pattern, subject, seed) triple); a shard is a run
of consecutive items, the unit of completion: a shard's outputs are committed together (see
:mod:`brain_diffuser_core.batch.store`), and a shard is done or not, never half done.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["Item", "Shard", "plan_shards", "plan_groups", "fingerprint"]


@dataclass(frozen=True)
class Item:
    """One unit of work: ``key`` (unique in the job, stable across runs; used in file names and the index)
    and ``params`` (small JSON values the worker needs, e.g. {"pattern": "faces", "subject": "1", "k": 3})."""

    key: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Shard:
    """``index`` (0-based position in the plan) and its ``items`` (consecutive in the plan's order)."""

    index: int
    items: tuple[Item, ...]

    @property
    def keys(self) -> list[str]:
        return [it.key for it in self.items]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


def plan_shards(items: Iterable[Item], shard_size: int) -> list[Shard]:
    """Cut ``items`` (in the given, deterministic order) into shards of ``shard_size`` (the last may be short).

    Raises ValueError for a shard size < 1 or duplicate item keys (an item must be written exactly once).
    """
    if int(shard_size) < 1:
        raise ValueError(f"'shard_size' must be a positive number of items; {shard_size!r} was provided")
    items = list(items)
    seen: set[str] = set()
    dupes = [it.key for it in items if it.key in seen or seen.add(it.key)]
    if dupes:
        raise ValueError(f"every item key must be unique in a job; {len(dupes)} repeat(s), e.g. {dupes[:3]}")
    size = int(shard_size)
    return [Shard(i // size, tuple(items[i:i + size])) for i in range(0, len(items), size)]


def plan_groups(groups: Iterable[Sequence[Item]], shard_size: int) -> list[Shard]:
    """Like :func:`plan_shards`, but no shard spans two groups (each group is cut on its own; shard indices
    run on across groups). For jobs whose workers batch items of one group together (one subject's test rows,
    one (ROI, subject)'s seeds): a shard's generation batches are then those of the single-process command."""
    groups = [list(g) for g in groups]
    plan_shards([it for g in groups for it in g], shard_size)  # refuses a bad size and repeated keys
    shards: list[Shard] = []
    size = int(shard_size)
    for g in groups:
        for i in range(0, len(g), size):
            shards.append(Shard(len(shards), tuple(g[i:i + size])))
    return shards


def consecutive_groups(items: Iterable[Item], *keys: str) -> list[list[Item]]:
    """Split ``items`` into runs of consecutive items with equal ``params[k]`` for every ``k`` in ``keys`` (a
    worker generates each run in one batch)."""
    groups: list[list[Item]] = []
    for it in items:
        if groups and all(groups[-1][0].params[k] == it.params[k] for k in keys):
            groups[-1].append(it)
        else:
            groups.append([it])
    return groups


class GroupedJob:
    """Mixin for a job whose items come in groups (``groups()``) that no shard may span."""

    def groups(self) -> list[list[Item]]:  # defined by the job
        raise NotImplementedError

    def items(self) -> list[Item]:
        return [it for g in self.groups() for it in g]

    def shards(self, shard_size: int) -> list[Shard]:
        return plan_groups(self.groups(), shard_size)


def fingerprint(obj: Any) -> str:
    """Hex sha256 of ``obj`` as canonical JSON (sorted keys, no whitespace): equal settings, equal fingerprint."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def items_digest(items: Sequence[Item]) -> str:
    """Hex sha256 of the items' keys and params in order (what a shard record must match)."""
    return fingerprint([[it.key, dict(it.params)] for it in items])
