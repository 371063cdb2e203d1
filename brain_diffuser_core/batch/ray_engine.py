"""The ``ray`` engine: shards run on a pool of model-holding Ray actors (Ray Data ``ActorPoolStrategy``).

Each actor opens the job's worker once (loads the models: one actor per GPU, or per ``cpus_per_worker``
CPUs) and then commits shard after shard into the output folder itself (which must be shared with the
workers: a cluster filesystem, or one machine). Ray Data restarts actors lost with their node and retries
their shards; a shard that is done already is found done and not recomputed (:func:`.engine.run_shard`).
Ray is imported only here, and only when this engine is used.

Where Ray runs:

* ``address=None``: an embedded local Ray, started and stopped by this process (``address="local"``: never
  attaches to a cluster recorded in ``/tmp/ray``).
* ``address="auto"`` or ``"host:port"`` (or ``$RAY_ADDRESS``): a running cluster, e.g. under SLURM
  (``deploy/slurm/``). The port is probed first, so a wrong address fails in ``connect_timeout`` seconds
  with the address named, instead of hanging.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Iterable, Sequence

from .engine import Job, run_shard
from .plan import Shard
from .store import BatchError, ShardStore

__all__ = ["RayEngine", "RayConnectError", "probe_address"]


class RayConnectError(BatchError):
    """No Ray cluster answers at the given address."""


def probe_address(address: str, timeout_s: float) -> None:
    """Wait until ``host:port`` accepts a TCP connection, at most ``timeout_s``; RayConnectError otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"'--ray-address' must be 'auto' or HOST:PORT of a Ray head (e.g. 10.0.0.5:6379); "
                         f"{address!r} was provided")
    t0, err = time.monotonic(), None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, max(0.1, timeout_s))):
                return
        except OSError as e:
            err = e
        waited = time.monotonic() - t0
        if waited >= timeout_s:
            raise RayConnectError(
                f"no Ray cluster answers at --ray-address {address}: nothing accepted a connection on "
                f"{host}:{port} in {waited:.1f} s of trying ({err}). Start the head there (`ray start --head "
                f"--port {port}`), check the address, or leave --ray-address out to run an embedded local Ray")
        time.sleep(0.25)


class _ShardActor:
    """One per pool slot: the job's worker (models) opened once; ``__call__`` runs a batch of shard indices."""

    def __init__(self, job: Job, store: ShardStore, shards: dict, retries: int):
        self.job, self.store, self.shards, self.retries = job, store, shards, retries
        self.worker = job.open_worker()

    def __call__(self, batch):
        import numpy as np

        results = [json.dumps(run_shard(self.job, self.worker, self.store, self.shards[int(i)], self.retries))
                   for i in batch["shard"]]
        return {"result": np.array(results, dtype=object)}


class RayEngine:
    """address : None (embedded local Ray), "auto" or "host:port"; workers : pool size (default: every GPU
    (with GPUs asked) or every CPU of the cluster, divided per worker); cpus_per_worker / gpus_per_worker :
    what each actor reserves (gpus default: 1 when the job's device is "cuda..." or "auto" on a cluster with
    GPUs, else 0); memory_gb : host memory each actor reserves (so big models are not packed past a host's
    RAM); connect_timeout : seconds to wait for ``address`` to answer; shards_in_flight : shards handed to an
    actor at once (2: the next one waits on the actor while it computes, so it never idles for the driver's
    hand-over; 1: no shard waits behind another, the tail of a job with few long shards balances best)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, workers: int | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float | None = None, memory_gb: float | None = None,
                 connect_timeout: float = 30.0, object_store_mb: int = 256, shards_in_flight: int = 2):
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.workers = workers
        self.cpus_per_worker = float(cpus_per_worker)
        self.gpus_per_worker = gpus_per_worker
        self.memory_gb = memory_gb
        self.connect_timeout = float(connect_timeout)
        self.object_store_mb = int(object_store_mb)
        if int(shards_in_flight) < 1:
            raise ValueError(f"shards_in_flight must be >= 1, got {shards_in_flight}")
        self.shards_in_flight = int(shards_in_flight)
        self._started = False
        self.start_seconds: float | None = None
        self.pool_size: int | None = None

    def describe(self) -> str:
        where = f"Ray cluster at {self.address}" if self.address else "embedded local Ray"
        return f"ray engine ({where}{f', {self.pool_size} worker(s)' if self.pool_size else ''})"

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Connect to (or start) Ray; idempotent. Sets :attr:`start_seconds`."""
        if self._started:
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        t0 = time.perf_counter()
        if self.address and self.address not in ("auto", "local") and not self.address.startswith("ray://"):
            probe_address(self.address, self.connect_timeout)
        import ray

        kwargs = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        try:
            if self.address and self.address != "local":
                ray.init(address=self.address, **kwargs)
            else:
                n_cpu = os.cpu_count() or 1
                if self.workers:
                    n_cpu = max(1, int(round(self.workers * self.cpus_per_worker)))
                ray.init(address="local", num_cpus=n_cpu, object_store_memory=self.object_store_mb << 20, **kwargs)
        except ConnectionError as err:
            raise RayConnectError(f"could not connect to the Ray cluster at --ray-address {self.address} after "
                                  f"{time.perf_counter() - t0:.1f} s: {err}. Start one with `ray start --head`, or "
                                  "leave --ray-address out to run an embedded local Ray") from None
        self._started = True
        self.start_seconds = time.perf_counter() - t0

    def _pool(self, job: Job) -> tuple[int, float]:
        import ray

        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        device = str(getattr(job, "device", "cpu"))
        need = self.gpus_per_worker
        if need is None:
            need = 1.0 if device.startswith("cuda") or (device == "auto" and gpus > 0) else 0.0
        where = f"the Ray cluster at {self.address}" if self.address else "the embedded local Ray"
        if need > 0 and gpus < need:
            raise BatchError(f"the job asks for {need:g} GPU(s) per worker (--device {device}) but {where} has "
                             f"{gpus:g} GPU(s) (resources: {cpus:g} CPU, {gpus:g} GPU). Use --device cpu, or start "
                             f"the worker nodes with GPUs (`ray start ... --num-gpus N`)")
        n = self.workers or int(gpus // need if need > 0 else cpus // max(self.cpus_per_worker, 1e-9))
        if n < 1:
            raise BatchError(f"{where} has {cpus:g} CPU(s); a worker needs {self.cpus_per_worker:g}: no worker fits. "
                             "Lower --cpus-per-worker or add worker nodes")
        return n, float(need)

    def check(self, job: Job) -> None:
        """Start Ray and check the job fits the cluster (GPUs asked of a cluster without any), before anything
        is written."""
        self.start()
        self._pool(job)

    # ------------------------------------------------------------------ run
    def map_shards(self, job: Job, store: ShardStore, shards: Sequence[Shard], retries: int) -> Iterable[dict]:
        self.start()
        import ray
        import ray.data

        n, gpus = self._pool(job)
        n = min(n, len(shards))
        self.pool_size = n
        ctx = ray.data.DataContext.get_current()
        for name, value in (("enable_progress_bars", False), ("print_on_execution_start", False),
                            ("verbose_stats_logs", False)):
            if hasattr(ctx, name):
                setattr(ctx, name, value)
        remote = {}
        if self.memory_gb:
            remote["memory"] = int(self.memory_gb * 2**30)
        # two shards in flight per actor by default: with one, each actor idled ~0.17 s per shard waiting for the
        # driver's hand-over when two actors shared two cores with it (benchmarks/batch_scale.py, 96 one-item
        # shards: compute-span speedup 1.37x -> 1.71x). Shards queued on an actor lost with its node are
        # retried like the running one (README: "Known cost"; the worker-kill test and benchmark: 0 lost, 0 duplicated)
        ds = ray.data.from_items([{"shard": s.index} for s in shards], override_num_blocks=len(shards))
        pool = ray.data.ActorPoolStrategy(size=n, max_tasks_in_flight_per_actor=self.shards_in_flight)
        ds = ds.map_batches(
            _ShardActor, batch_size=1, compute=pool, num_cpus=self.cpus_per_worker, num_gpus=gpus,
            fn_constructor_kwargs={"job": job, "store": store, "shards": {s.index: s for s in shards},
                                   "retries": retries}, **remote)
        for row in ds.iter_rows():
            yield json.loads(row["result"])

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
