"""Run a batch job's shards on an engine: ``local`` (this process) or ``ray`` (:mod:`.ray_engine`).

A job (see :class:`Job`) says what its items are, which settings decide its outputs, and how to open a worker
(the model-holding object: loaded once per process or Ray actor) that turns a list of items into
:class:`~brain_diffuser_core.batch.store.ItemOutput` s. :func:`run_job` plans the shards, skips the done ones,
hands the others to the engine, and writes the index. :func:`run_shard` is what every engine runs per shard,
so the local and Ray engines write the same bytes.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from .plan import Item, Shard, plan_shards
from .store import BatchDiskFullError, BatchError, ItemOutput, ShardStore

__all__ = ["Job", "Worker", "LocalEngine", "run_shard", "run_job", "BatchSummary", "parse_part", "worker_info"]


class Worker(Protocol):
    def run(self, items: Sequence[Item]) -> list[ItemOutput]:
        """Outputs of ``items`` (one per item, in order); must depend only on the items and the job's settings."""


class Job(Protocol):
    """kind : the command ("sweep", ...); batch_size : items per ``Worker.run`` call; device : "cpu", "cuda",
    "auto" (what a worker asks the engine for)."""

    kind: str
    batch_size: int
    device: str

    def settings(self) -> dict:
        """JSON values that decide the outputs (fingerprinted; a rerun with others is refused)."""

    def items(self) -> list[Item]:
        """Every item of the job, in a deterministic order."""

    def open_worker(self) -> Worker:
        """Load the models (once per process / actor) and return the worker."""

    # optional: shards(shard_size) -> list[Shard] (default plan_shards(items(), shard_size));
    # prepare(store) on the driver before any shard runs; shard_files(shard, outputs) -> {rel: bytes}
    # for one file per shard made from the items' ``arrays`` (see brain_diffuser_core.batch.extract)


def worker_info() -> dict:
    """Who computed a shard: host, pid and (under Ray) the node id."""
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "node": "local"}
    try:
        import sys

        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                info["node"] = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - informative only
        pass
    return info


def run_shard(job: Job, worker: Worker, store: ShardStore, shard: Shard, retries: int = 2) -> dict:
    """Compute and commit one shard unless it is done already (checked here too: a retried or duplicated task
    finds the record and returns it). Returns {"shard", "status": "done" | "skipped" | "failed", "record" or
    "error" + "items" (the keys of the failing batch), "fatal" (disk full: stop the job)}.

    Each batch of ``job.batch_size`` items gets ``1 + retries`` attempts; the error of the last one is kept.
    """
    record = store.done_record(shard)
    if record is not None:
        return {"shard": shard.index, "status": "skipped", "record": record}
    t0 = time.perf_counter()
    outputs: list[ItemOutput] = []
    size = max(1, int(job.batch_size))
    for start in range(0, len(shard.items), size):
        batch = shard.items[start:start + size]
        for attempt in range(1 + max(0, int(retries))):
            try:
                outputs += worker.run(batch)
                break
            except Exception as err:  # noqa: BLE001 - reported with the items, the other shards go on
                if attempt == retries:
                    return {"shard": shard.index, "status": "failed", "items": [it.key for it in batch],
                            "error": f"{type(err).__name__}: {err}", "attempts": attempt + 1,
                            "traceback": traceback.format_exc(limit=6)}
    try:
        # a job that writes one file per shard (features) makes it from the items' arrays
        shard_files = job.shard_files(shard, outputs) if hasattr(job, "shard_files") else None
        record = store.commit(shard, outputs, worker=worker_info(), seconds=time.perf_counter() - t0,
                              shard_files=shard_files)
    except BatchDiskFullError as err:
        return {"shard": shard.index, "status": "failed", "items": shard.keys, "error": str(err), "fatal": True}
    return {"shard": shard.index, "status": "done", "record": record}


class LocalEngine:
    """This process, one shard after another; Ray is never imported."""

    name = "local"

    def describe(self) -> str:
        return "local engine (this process)"

    def map_shards(self, job: Job, store: ShardStore, shards: Sequence[Shard], retries: int) -> Iterable[dict]:
        worker = job.open_worker() if shards else None
        for shard in shards:
            yield run_shard(job, worker, store, shard, retries)

    def close(self) -> None:
        pass


@dataclass
class BatchSummary:
    """What one :func:`run_job` call did: counts of shards and items, per-state, and the failures."""

    out: str
    n_shards: int
    n_items: int
    skipped: int = 0  # shards found done before this run
    computed: int = 0  # shards computed by this run
    failures: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)


def parse_part(text: str | None) -> tuple[int, int] | None:
    """'K/N' (0 <= K < N; e.g. a SLURM array task id and the array size) -> (K, N); None passes."""
    if text is None:
        return None
    try:
        k, n = (int(t) for t in str(text).split("/"))
    except ValueError:
        raise ValueError(f"'--part' must look like K/N (this part K of N, 0 <= K < N), e.g. "
                         f"\"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT\"; {text!r} was provided") from None
    if not 0 <= k < n:
        raise ValueError(f"'--part' K/N needs 0 <= K < N; {text!r} was provided")
    return k, n


def _part_of(shards: list[Shard], part: tuple[int, int] | None) -> list[Shard]:
    """The K-th of N contiguous, near-equal ranges of the plan's shards."""
    if part is None:
        return shards
    k, n = part
    lo, hi = len(shards) * k // n, len(shards) * (k + 1) // n
    return shards[lo:hi]


def run_job(job: Job, out: str | os.PathLike, *, engine=None, shard_size: int = 4, retries: int = 2,
            part: tuple[int, int] | None = None, progress: bool = True,
            log: Callable[[str], None] | None = print) -> BatchSummary:
    """Plan ``job`` into shards of ``shard_size`` items, skip the done ones, run the rest on ``engine``
    (default :class:`LocalEngine`), write the index, and return a :class:`BatchSummary`.

    part : (K, N) runs only the K-th of N contiguous shard ranges (SLURM job arrays); the index then lists
        every finished shard of the whole plan. Raises :class:`BatchError` after the run when shards failed
        (naming the items and the error; every other shard finished and is kept) or the disk is full.
    """
    from tqdm import tqdm

    engine = engine or LocalEngine()
    t0 = time.perf_counter()
    items = job.items()
    # a job may cut its own plan (e.g. no shard across subjects: see plan.plan_groups)
    shards = job.shards(shard_size) if hasattr(job, "shards") else plan_shards(items, shard_size)
    settings = {**job.settings(), "shard_size": int(shard_size)}
    if hasattr(engine, "check"):
        engine.check(job)  # e.g. GPUs asked of a cluster without any: refused before anything is written
    store = ShardStore(out, job.kind, settings, n_items=len(items), shard_size=shard_size)
    if hasattr(job, "prepare"):
        job.prepare(store)  # files the whole job shares (e.g. a feature folder's meta.json)
    mine = _part_of(shards, part)
    summary = BatchSummary(out=str(out), n_shards=len(shards), n_items=len(items))
    records: dict[int, dict] = {}
    todo = []
    for shard in mine:
        rec = store.done_record(shard)
        if rec is None:
            todo.append(shard)
        else:
            records[shard.index] = rec
    summary.skipped = len(mine) - len(todo)
    if log:
        scope = f" (part {part[0]}/{part[1]}: shards {mine[0].index}-{mine[-1].index})" if part and mine else ""
        log(f"{job.kind}: {len(items)} items in {len(shards)} shards{scope}; {summary.skipped} shard(s) done "
            f"already, {len(todo)} to run on the {engine.describe()}")
    n_todo_items = sum(len(s.items) for s in todo)
    shard_bar = tqdm(total=len(todo), desc=f"{job.kind} shards", unit="shard", disable=not progress, position=0)
    item_bar = tqdm(total=n_todo_items, desc=f"{job.kind} items", unit="item", disable=not progress, position=1)
    fatal = None
    try:
        if todo:
            for result in engine.map_shards(job, store, todo, retries):
                shard_bar.update(1)
                if result["status"] == "failed":
                    summary.failures.append(result)
                    if result.get("fatal"):
                        fatal = result
                        break
                    continue
                item_bar.update(len(result["record"]["items"]))
                records[result["shard"]] = result["record"]
                summary.computed += result["status"] == "done"
                summary.skipped += result["status"] == "skipped"  # finished meanwhile by another process
    finally:
        shard_bar.close()
        item_bar.close()
        # every finished shard of the whole plan (other array tasks' too), so the index is the folder's truth
        all_records = [r for s in shards if (r := records.get(s.index) or store.done_record(s)) is not None]
        summary.records = all_records
        complete = len(all_records) == len(shards)
        try:
            summary.rows = store.write_index(all_records, complete=complete)
        except BatchDiskFullError as err:
            if fatal is None:
                fatal = {"error": str(err), "items": []}
    summary.seconds = time.perf_counter() - t0
    if fatal is not None:
        raise BatchDiskFullError(28, fatal["error"])
    if summary.failures:
        lines = [f"  shard {f['shard']}: item(s) {', '.join(f['items'])} failed after {f.get('attempts', 1)} "
                 f"attempt(s): {f['error']}" for f in summary.failures]
        n_ok = sum(len(r["items"]) for r in all_records)
        raise BatchError(f"{job.kind}: {len(summary.failures)} shard(s) failed on every attempt; the other "
                         f"{n_ok} item(s) are finished and kept in {out}:\n" + "\n".join(lines)
                         + "\nFix the cause and rerun the same command: only the missing shards run.")
    return summary
