"""The Ray scenarios of tests/test_batch_ray.py, run inside a network namespace of their own (only loopback).

``python tests/ray_scenarios.py SPEC.json`` with SPEC = {"tmp", "sweep_args" (the sweep CLI arguments without
--out), "result"}; writes a JSON report to SPEC["result"]. Scenarios, on one cluster (a head with no CPUs and
two 1-CPU worker nodes):

1. a sweep on the cluster; once both worker nodes have committed shards, worker node 1's raylet is SIGKILLed;
   the command must still finish (the report lists who computed what);
2. a sweep whose driver is SIGKILLed mid-run, then rerun: the report says what was done before the rerun and
   what the rerun computed;
3. the same sweep asking for GPUs on this GPU-less cluster: the message.
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
    report: dict = {"interfaces": subprocess.run(["ip", "-brief", "addr"], capture_output=True, text=True).stdout}
    with Cluster(tmp / "cluster") as cluster:
        cluster.start(2)
        report["cluster_start_s"] = cluster.start_seconds
        report["nodes"] = cluster.nodes()
        report["worker_node_ids"] = cluster.node_ids
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
        before = {name: (out / "shards" / name).stat().st_mtime_ns for name in records(out)}
        report["driver_kill_done_before"] = sorted(before)
        rerun = subprocess.run([sys.executable, "-m", "brain_diffuser_core", *common, "--out", str(out)],
                               env=ray_env(), capture_output=True, text=True, timeout=300)
        report["rerun_rc"] = rerun.returncode
        report["rerun_log"] = (rerun.stdout + rerun.stderr)[-3000:]
        report["driver_kill_unchanged"] = sorted(n for n, t in before.items()
                                                 if (out / "shards" / n).stat().st_mtime_ns == t)
        report["driver_kill_out"] = str(out)

        # 3. GPUs asked of a cluster without any
        gpu = subprocess.run([sys.executable, "-m", "brain_diffuser_core", *common, "--device", "cuda",
                              "--out", str(tmp / "gpu")], env=ray_env(), capture_output=True, text=True, timeout=300)
        report["gpu_rc"] = gpu.returncode
        report["gpu_err"] = gpu.stderr[-2000:]
    Path(spec["result"]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
