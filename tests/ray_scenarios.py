"""The Ray scenarios of tests/test_batch_ray.py, run inside a network namespace of their own (only loopback).

``python tests/ray_scenarios.py SPEC.json`` with SPEC = {"tmp", "sweep_args" (the sweep CLI arguments without
--out), "local" (the local engine's output folder), "result"}; writes a JSON report to SPEC["result"]. Scenarios, on one cluster (a head with no CPUs and
two 1-CPU worker nodes):

1. a sweep on the cluster; once both worker nodes have committed shards, worker node 1's raylet is SIGKILLed;
   the command must still finish (the report lists who computed what);
2. a sweep whose driver is SIGKILLed mid-run, then partial files planted (a finished shard's image truncated,
   garbage at an unfinished image's final name), then rerun: the report says what was done before the rerun
   and what the rerun computed.

(GPUs asked of a GPU-less cluster: tests/test_batch.py, against the engine's resource check; a driver process
of its own here cost ~13 s.)
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from ray_cluster import Cluster, ray_env


def records(out: Path) -> dict[str, dict]:
    found = {}
    for p in sorted((out / "shards").glob("shard-*.json")):
        try:
            found[p.name] = json.loads(p.read_text())
        except ValueError:
            pass
    return found


def driver(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "brain_diffuser_core", *args], env=ray_env(),
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the driver exited (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    tmp = Path(spec["tmp"])
    report: dict = {"interfaces": subprocess.run(["ip", "-brief", "addr"], capture_output=True, text=True).stdout,
                    "seconds": {}}
    t0 = time.perf_counter()

    def lap(name: str) -> None:  # wall seconds of each phase (to see where the test's time goes)
        nonlocal t0
        report["seconds"][name] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
    with Cluster(tmp / "cluster") as cluster:
        cluster.start(2)
        report["cluster_start_s"] = cluster.start_seconds
        report["nodes"] = cluster.listed  # (the listing the cluster's start made)
        report["worker_node_ids"] = cluster.node_ids
        lap("cluster")
        # no --workers: the pool is sized from the cluster (2 actors; 1 once a node is lost)
        common = [*spec["sweep_args"], "--engine", "ray", "--ray-address", cluster.address, "--no-progress"]

        # 1. worker node killed mid-run
        out = tmp / "killed-worker"
        proc = driver([*common, "--out", str(out)], tmp / "killed-worker.log")
        try:
            def both_nodes_worked():
                nodes = [r["worker"]["node"] for r in records(out).values()]
                return all(nodes.count(n) >= 1 for n in cluster.node_ids)

            wait_for(both_nodes_worked, 240, "both worker nodes to commit a shard", proc)
            report["done_at_kill"] = len(records(out))
            report["killed_raylet_pid"] = cluster.kill_worker(1)
            report["killed_node"] = cluster.node_ids[1]
            report["killed_worker_rc"] = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        report["killed_worker_log"] = (tmp / "killed-worker.log").read_text()[-3000:]
        report["killed_worker_out"] = str(out)
        lap("worker_kill")

        # 2. driver killed mid-run, then rerun
        out = tmp / "killed-driver"
        proc = driver([*common, "--out", str(out)], tmp / "killed-driver-1.log")
        try:
            wait_for(lambda: len(records(out)) >= 2, 240, "two shards of the driver-kill run", proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        time.sleep(3)  # the job's actors end with their driver; any shard they were committing lands now
        # planted partial files: a finished shard's image truncated under its final name (record intact), and
        # garbage at the final name of an image whose shard never finished: neither may be taken as done
        done = records(out)
        planted = sorted(done)[0]
        first = out / next(iter(done[planted]["items"][0]["files"]))
        first.write_bytes(first.read_bytes()[:100])
        report["planted_partial_shard"] = planted
        finished = {rel for rec in done.values() for item in rec["items"] for rel in item["files"]}
        local_images = sorted(p.relative_to(spec["local"]).as_posix() for p in Path(spec["local"]).rglob("*.png"))
        missing = [rel for rel in local_images if rel not in finished]
        (out / missing[0]).parent.mkdir(parents=True, exist_ok=True)
        (out / missing[0]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        before = {name: (out / "shards" / name).stat().st_mtime_ns for name in done if name != planted}
        report["driver_kill_done_before"] = sorted(before)
        rerun = subprocess.run([sys.executable, "-m", "brain_diffuser_core", *common, "--out", str(out)],
                               env=ray_env(), capture_output=True, text=True, timeout=300)
        report["rerun_rc"] = rerun.returncode
        report["rerun_log"] = (rerun.stdout + rerun.stderr)[-3000:]
        report["driver_kill_unchanged"] = sorted(n for n, t in before.items()
                                                 if (out / "shards" / n).stat().st_mtime_ns == t)
        report["driver_kill_out"] = str(out)
        lap("driver_kill_and_rerun")

    lap("cluster_stop")
    Path(spec["result"]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
