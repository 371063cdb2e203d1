"""The same sweep on 1 and 2 Ray worker nodes (one thread each): speedup, Ray's fixed cost, and items lost or
duplicated after a worker node is killed mid-run. Baseline measured in the same run: the local engine.

Everything runs on this machine in a network namespace of its own (only loopback; re-executed under
`unshare -n`, needs root), every Ray process started and ended here by PID (tests/ray_cluster.py). Uses the
tests' tiny MiniNSD world and tiny random-weight bundle, so an item is a fraction of a second of real pipeline
work (decode + VDVAE + img2img); figures on a contended machine say so in the output.

    python benchmarks/batch_scale.py [--seeds 4] [--patterns faces,V1] [--steps 8] [--out FILE.json]

Reported:
  local_s             the local engine, whole command (model load included)
  ray1_s, ray2_s      the command on a cluster of 1 / 2 worker nodes (1 CPU each), driver start to end
  speedup             ray1_s / ray2_s (target >= 1.6 on 2 free cores)
  work1_s, work2_s    first shard start to last shard end (compute span, without start-up); work_speedup
  cluster_start_s     head + worker nodes up; connect_s: the driver's ray.init to a running cluster
  embedded_s          --engine ray without --ray-address (embedded local Ray, 1 worker): embedded_s - local_s
                      is the fixed cost of starting Ray in-process
  lost, duplicated    after a worker node's raylet is SIGKILLed mid-run on 2 nodes (target 0 and 0)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

IN_NETNS = "BDE_BENCH_IN_NETNS"


def _cli(args: list[str], log: Path, env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "brain_diffuser_core", *args], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    dt = time.perf_counter() - t0
    log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({r.returncode}): {(r.stdout + r.stderr)[-3000:]}")
    return dt, r.stdout + r.stderr


def _work_span(out: Path) -> float:
    """First shard start to last shard end, from the shard records (end = file mtime, start = end - seconds)."""
    spans = []
    for p in (out / "shards").glob("shard-*.json"):
        rec = json.loads(p.read_text())
        end = p.stat().st_mtime
        spans.append((end - float(rec.get("seconds") or 0), end))
    return max(e for _, e in spans) - min(s for s, _ in spans)


def _images(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--patterns", default="faces,V1")
    ap.add_argument("--subjects", default="1,average")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="keep sources and outputs here (default: a temp folder)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if os.environ.get(IN_NETNS) != "1":
        from ray_cluster import in_own_netns

        env = dict(os.environ, **{IN_NETNS: "1"})
        return subprocess.call(in_own_netns([sys.executable, *sys.argv]), env=env)

    from app_sources import make_app_sources
    from batch_sources import make_batch_sources
    from ray_cluster import Cluster, ray_env

    work = Path(args.workdir or tempfile.mkdtemp(prefix="batch-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building the tiny world and bundle in {work} ...", flush=True)
    sources = make_batch_sources(make_app_sources(work / "src"), work / "b")
    bundle, world, cache = sources
    sweep = ["sweep", "--bundle", bundle, "--nsd-root", world, "--cache-dir", cache, "--patterns", args.patterns,
             "--subjects", args.subjects, "--seeds", str(args.seeds), "--steps", str(args.steps), "--threads", "1",
             "--shard-size", "1", "--no-progress"]
    env = ray_env()
    fig: dict = {"load_average_at_start": os.getloadavg(), "cpu_count": os.cpu_count(),
                 "affinity": sorted(os.sched_getaffinity(0))}

    fig["local_s"], _ = _cli([*sweep, "--out", str(work / "local")], work / "local.log", env)
    local = _images(work / "local")
    n_items = len(json.loads((work / "local/index.json").read_text())["rows"])
    fig["items"] = n_items
    fig["local_work_s"] = _work_span(work / "local")
    print(f"local engine: {fig['local_s']:.1f} s for {n_items} items", flush=True)

    dt, text = _cli([*sweep, "--engine", "ray", "--workers", "1", "--out", str(work / "embedded")],
                    work / "embedded.log", env)
    fig["embedded_s"] = dt
    fig["embedded_ray_start_s"] = float(re.search(r"Ray started in ([\d.]+) s", text).group(1))
    fig["embedded_equal_local"] = _images(work / "embedded") == local

    for n in (1, 2):
        with Cluster(work / f"cluster{n}") as cluster:
            cluster.start(n)
            fig[f"cluster{n}_start_s"] = cluster.start_seconds
            dt, text = _cli([*sweep, "--engine", "ray", "--ray-address", cluster.address, "--workers", str(n),
                             "--out", str(work / f"ray{n}")], work / f"ray{n}.log", env)
            fig[f"ray{n}_s"] = dt
            fig[f"connect{n}_s"] = float(re.search(r"Ray started in ([\d.]+) s", text).group(1))
            fig[f"work{n}_s"] = _work_span(work / f"ray{n}")
            fig[f"ray{n}_equal_local"] = _images(work / f"ray{n}") == local
            print(f"{n} worker node(s): {dt:.1f} s (compute span {fig[f'work{n}_s']:.1f} s)", flush=True)
            if n == 2:  # the kill run on the same cluster
                out = work / "killed"
                proc = subprocess.Popen([sys.executable, "-m", "brain_diffuser_core", *sweep, "--engine", "ray",
                                         "--ray-address", cluster.address, "--out", str(out)],
                                        env=env, cwd=ROOT, stdout=open(work / "killed.log", "wb"),
                                        stderr=subprocess.STDOUT)
                try:
                    deadline = time.time() + 600
                    while len(list((out / "shards").glob("shard-*.json"))) < max(2, n_items // 4):
                        if time.time() > deadline or proc.poll() is not None:
                            raise RuntimeError("the kill run ended or stalled before the kill")
                        time.sleep(0.2)
                    fig["done_at_kill"] = len(list((out / "shards").glob("shard-*.json")))
                    cluster.kill_worker(1)
                    t_kill = time.perf_counter()
                    fig["kill_rc"] = proc.wait(timeout=900)
                    fig["after_kill_s"] = time.perf_counter() - t_kill
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                rows = json.loads((out / "index.json").read_text())["rows"]
                keys = [r["key"] for r in rows]
                expected = set(json.loads((work / "local/index.json").read_text())["rows"][i]["key"]
                               for i in range(n_items))
                fig["lost"] = len(expected - set(keys))
                listed = {r[c] for r in rows for c in r if c.startswith("file:")}
                on_disk = {str(p.relative_to(out)) for p in (out / "images").rglob("*.png")}
                fig["duplicated"] = (len(keys) - len(set(keys))) + len(on_disk - listed)
                fig["killed_equal_local"] = _images(out) == local

    fig["speedup"] = fig["ray1_s"] / fig["ray2_s"]
    fig["work_speedup"] = fig["work1_s"] / fig["work2_s"]
    fig["embedded_fixed_cost_s"] = fig["embedded_s"] - fig["local_s"]
    fig["load_average_at_end"] = os.getloadavg()
    print(json.dumps(fig, indent=1))
    print(f"\nspeedup 2 vs 1 worker nodes: {fig['speedup']:.2f}x whole command, {fig['work_speedup']:.2f}x compute "
          f"span; Ray fixed cost: cluster start {fig['cluster2_start_s']:.1f} s, connect {fig['connect2_s']:.1f} s, "
          f"embedded Ray {fig['embedded_fixed_cost_s']:.1f} s over the local engine; after a worker kill: "
          f"{fig['lost']} lost, {fig['duplicated']} duplicated; load average {fig['load_average_at_start']}")
    if args.out:
        Path(args.out).write_text(json.dumps(fig, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
