"""The ray engine on a real multi-node cluster on this machine: a head and two worker nodes, every process
started and ended by the test by PID, inside a network namespace of its own (only loopback), auth disabled.

One cluster serves every scenario. The scenarios run in tests/ray_scenarios.py (a network namespace holds a process tree, not a Python thread);
this file checks its report against the local engine's output.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_cluster import ROOT, in_own_netns

SWEEP = ["--patterns", "V1", "--subjects", "1,average", "--seeds", "4", "--shard-size", "1"]


def _netns_available() -> str | None:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare (util-linux) and ip (iproute2)"
    r = subprocess.run(in_own_netns(["true"]), capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot make a network namespace here: {r.stderr.strip()}"


def _index(out: Path) -> list[dict]:
    return json.loads((out / "index.json").read_text())["rows"]


def _images(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def test_a_two_node_cluster_survives_a_lost_node_and_a_lost_driver_and_matches_local(batch_sources, tmp_path):
    why = _netns_available()
    if why:  # the tests run as root in CI (`make test`), where this holds
        pytest.fail(why)
    from brain_diffuser_core.__main__ import main

    bundle, world, cache = batch_sources
    args = ["sweep", "--bundle", bundle, "--nsd-root", world, "--cache-dir", cache, "--steps", "16",
            "--threads", "1", *SWEEP]
    local = tmp_path / "local"
    assert main([*args, "--out", str(local), "--no-progress"]) == 0
    n_items = len(_index(local))
    assert n_items == 8

    spec = {"tmp": str(tmp_path / "ray"), "sweep_args": args, "local": str(local),
            "result": str(tmp_path / "report.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run(in_own_netns([sys.executable, str(ROOT / "tests/ray_scenarios.py"),
                                     str(tmp_path / "spec.json")]),
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    print("ray scenario seconds:", rep["seconds"], "done at the worker kill:", rep["done_at_kill"])

    # loopback only: the namespace has lo alone and every node is on 127.0.0.1
    assert [line.split()[0] for line in rep["interfaces"].splitlines()] == ["lo"]
    assert {n["ip"] for n in rep["nodes"]} == {"127.0.0.1"} and len(rep["nodes"]) == 3

    # 1. a worker node killed mid-run: the command finished, every item exactly once, from both nodes,
    #    byte for byte the local engine's
    out = Path(rep["killed_worker_out"])
    assert rep["killed_worker_rc"] == 0, rep["killed_worker_log"]
    assert rep["done_at_kill"] < n_items, "the worker node was killed after the run had finished"
    keys = [row["key"] for row in _index(out)]
    assert len(keys) == len(set(keys)) == n_items
    assert _images(out) == _images(local)
    nodes = [json.loads(p.read_text())["worker"]["node"] for p in (out / "shards").glob("shard-*.json")]
    assert set(nodes) == set(rep["worker_node_ids"])  # both worker nodes computed shards (none the head)
    survivor = rep["worker_node_ids"][0]
    assert nodes.count(survivor) >= n_items - rep["done_at_kill"]  # what was left went to the survivor

    # 2. the driver killed mid-run, partial files planted: the rerun computes only what was missing (the shard
    #    with a truncated image among it), and never takes a planted file as done
    out = Path(rep["driver_kill_out"])
    done_before = rep["driver_kill_done_before"]
    assert 1 <= len(done_before) < n_items - 1 and rep["planted_partial_shard"] not in done_before
    assert rep["rerun_rc"] == 0, rep["rerun_log"]
    assert f"{len(done_before)} shard(s) done already, {n_items - len(done_before)} to run" in rep["rerun_log"]
    assert rep["driver_kill_unchanged"] == done_before  # the finished shards were not rewritten
    keys = [row["key"] for row in _index(out)]
    assert len(keys) == len(set(keys)) == n_items and _images(out) == _images(local)
