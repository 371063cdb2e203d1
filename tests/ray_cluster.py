"""A Ray cluster of one head and N worker nodes on this machine, for tests and benchmarks (tests/test_batch_ray.py,
benchmarks/batch_scale.py). Every process is started here, remembered by PID and ended here by PID (never
`ray stop`, which would end every Ray process of the machine).

Run it inside a network namespace of its own (:func:`in_own_netns` re-executes a script there with only
loopback up), so Ray binds 127.0.0.1 and nothing else; auth is disabled for these private processes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: node death noticed in about 2 s instead of about 20 s (see ../shared/RAY.md)
FAST_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
               "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}


def ray_env(**extra) -> dict:
    """The environment of every Ray process and driver here: auth off, no usage stats, the repo importable."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **FAST_HEALTH, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("RAY_ADDRESS", None)
    return env


def in_own_netns(argv: list[str]) -> list[str]:
    """A command line that runs ``argv`` in a new network namespace with only loopback up (needs root)."""
    script = 'ip link set lo up && exec "$@"'
    return ["unshare", "-n", "sh", "-c", script, "sh", *argv]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


class Cluster:
    """``Cluster(tmp).start(n_workers)``; ``.address``; ``.kill_worker(i)`` (SIGKILL of the node's raylet);
    ``.stop()`` ends every process started here (also on errors: use it as a context manager)."""

    def __init__(self, tmp: str | Path, cpus_per_worker: int = 1):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Ray's socket paths must stay short (AF_UNIX limit): a short temp dir of our own
        self.ray_tmp = Path(f"/tmp/rt{os.getpid()}")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cpus_per_worker = cpus_per_worker
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.node_ids: list[str] = []  # worker i's Ray node id
        self.listed: list[dict] = []  # the last node listing (see nodes())
        self.start_seconds: float | None = None

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _popen(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.tmp / log, "wb")
        return subprocess.Popen([_ray_bin(), "start", *args, "--block"], stdout=out, stderr=subprocess.STDOUT,
                                env=ray_env(), cwd=ROOT, start_new_session=True)

    def start(self, n_workers: int, timeout: float = 120.0) -> "Cluster":
        t0 = time.perf_counter()
        self.head = self._popen(["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false",
                                 "--object-store-memory=100000000", f"--temp-dir={self.ray_tmp}",
                                 "--disable-usage-stats"], "head.log")
        self._wait_port(timeout)
        for i in range(n_workers):  # one after another: concurrent starts collide on ports
            self.workers.append(self._popen(
                [f"--address={self.address}", f"--num-cpus={self.cpus_per_worker}",
                 "--object-store-memory=100000000", f"--dashboard-agent-listen-port={_free_port()}",
                 "--min-worker-port=0", "--max-worker-port=0", "--include-log-monitor=false",
                 f"--resources={json.dumps({f'worker{i}': 1})}"], f"worker{i}.log"))
            self._wait_started(i, timeout)
        # one listing for every node (each listing is a Python process of its own that imports Ray: seconds)
        self.node_ids = self._wait_nodes([f"worker{i}" for i in range(n_workers)], timeout)
        self.start_seconds = time.perf_counter() - t0
        return self

    def _wait_started(self, i: int, timeout: float) -> None:
        """Until worker node i's `ray start` says it joined (its log; no Ray client process needed)."""
        log, deadline = self.tmp / f"worker{i}.log", time.time() + timeout
        while time.time() < deadline:
            if self.workers[i].poll() is not None:
                raise RuntimeError(f"worker node {i} exited: " + log.read_text()[-2000:])
            if "Ray runtime started" in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker node {i} did not start in {timeout} s: " + log.read_text()[-2000:])

    def _wait_port(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.head.poll() is not None:
                raise RuntimeError("the Ray head exited: " + (self.tmp / "head.log").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the Ray head did not answer on {self.address} in {timeout} s")

    def nodes(self) -> list[dict]:
        """Alive nodes as {"id", "ip", "resources"}, read by a short-lived driver (its own process)."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress'], 'resources': n['Resources']}"
                " for n in ray.nodes() if n['Alive']]))" % self.address)
        r = subprocess.run([sys.executable, "-c", code], env=ray_env(), capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"could not list the cluster's nodes: {r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def _wait_nodes(self, resources: list[str], timeout: float) -> list[str]:
        """The node ids of the alive nodes holding ``resources`` (one each), in that order."""
        deadline = time.time() + timeout
        while True:
            self.listed = self.nodes()
            found = {r: n["id"] for n in self.listed for r in resources if r in n["resources"]}
            if len(found) == len(resources):
                return [found[r] for r in resources]
            if time.time() > deadline:
                raise RuntimeError(f"worker nodes {sorted(set(resources) - set(found))} did not join "
                                   f"{self.address} in {timeout} s")
            time.sleep(0.5)

    def raylet_pid(self, i: int) -> int:
        import psutil

        for child in psutil.Process(self.workers[i].pid).children(recursive=True):
            if child.name() == "raylet":
                return child.pid
        raise RuntimeError(f"worker node {i} has no raylet process")

    def kill_worker(self, i: int) -> int:
        """SIGKILL worker node i's raylet (its actors die with it); returns the raylet's PID."""
        pid = self.raylet_pid(i)
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        """End every process started here: each `ray start --block` and all its descendants, by PID."""
        import psutil

        procs = [p for p in [self.head, *self.workers] if p is not None]
        victims = []
        for p in procs:
            try:
                victims += [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        sessions = {p.pid for p in procs}  # started with start_new_session: their sid is their pid
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) in sessions:
                    victims.append(proc.pid)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        for p in reversed(procs):  # workers first, then the head
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 3  # a short grace (the processes are ours alone), then SIGKILL
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
