"""The batch layer on the local engine: shard plan, atomic shard commits, resuming, refusals, failures, sweep.

Ray's engine and clusters are tested in tests/test_batch_ray.py.
"""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batch_jobs import ToyJob, calls
from brain_diffuser_core.batch import (BatchDiskFullError, BatchError, BatchSettingsError, Item, plan_shards,
                                       run_job)

ROOT = Path(__file__).resolve().parents[1]


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "out").glob("*.bin"))}


def test_plan_is_deterministic_and_refuses_duplicate_keys():
    items = [Item(f"k{i}", {"i": i}) for i in range(10)]
    a, b = plan_shards(items, 4), plan_shards(list(items), 4)
    assert [s.keys for s in a] == [s.keys for s in b] == [["k0", "k1", "k2", "k3"], ["k4", "k5", "k6", "k7"],
                                                          ["k8", "k9"]]
    assert [s.name for s in a] == ["shard-00000", "shard-00001", "shard-00002"]
    with pytest.raises(ValueError, match="unique"):
        plan_shards(items + [Item("k3")], 4)
    with pytest.raises(ValueError, match="positive"):
        plan_shards(items, 0)


def test_local_run_writes_every_item_once_and_a_rerun_computes_nothing(tmp_path):
    out, log = tmp_path / "out", tmp_path / "calls.txt"
    s = run_job(ToyJob(10, calls_file=str(log)), out, shard_size=3, progress=False, log=None)
    assert (s.n_shards, s.computed, s.skipped) == (4, 4, 0)
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and [r["key"] for r in index["rows"]] == [f"i{k:03d}" for k in range(10)]
    assert sorted(calls(log)) == [f"i{k:03d}" for k in range(10)]  # each computed exactly once
    assert (out / "index.csv").read_text().splitlines()[0].startswith("key,k,sum,file:vec")
    before = _files(out)
    s2 = run_job(ToyJob(10, calls_file=str(log)), out, shard_size=3, progress=False, log=None)
    assert (s2.computed, s2.skipped) == (0, 4) and len(calls(log)) == 10 and _files(out) == before


def test_a_changed_setting_is_refused_and_the_folder_untouched(tmp_path):
    out = tmp_path / "out"
    run_job(ToyJob(6), out, shard_size=3, progress=False, log=None)
    before = _files(out)
    with pytest.raises(BatchSettingsError, match=r"other settings \(scale: 1.0 there, 2.0 now\).*another --out"):
        run_job(ToyJob(6, scale=2.0), out, shard_size=3, progress=False, log=None)
    with pytest.raises(BatchSettingsError, match="shard_size"):
        run_job(ToyJob(6), out, shard_size=2, progress=False, log=None)
    assert _files(out) == before


def test_planted_or_truncated_files_are_never_taken_as_done(tmp_path):
    out, log = tmp_path / "out", tmp_path / "calls.txt"
    run_job(ToyJob(12, calls_file=str(log)), out, shard_size=3, progress=False, log=None)
    good = _files(out)
    shards = out / "shards"
    # shard 0: an item file truncated under its final name (record intact)
    f0 = out / "out/i001_vec.bin"
    f0.write_bytes(f0.read_bytes()[:100])
    # shard 1: its record cut in half (a writer killed mid-write without the atomic rename)
    r1 = shards / "shard-00001.json"
    r1.write_text(r1.read_text()[: len(r1.read_text()) // 2])
    # shard 2: no record, but its files planted at their final names (one of them garbage)
    (shards / "shard-00002.json").unlink()
    (out / "out/i006_vec.bin").write_bytes(b"\0" * 256)
    # shard 3: a same-size file with other bytes (only the checksum can tell)
    f3 = out / "out/i009_vec.bin"
    f3.write_bytes(bytes(reversed(f3.read_bytes())))
    open(log, "w").close()
    s = run_job(ToyJob(12, calls_file=str(log)), out, shard_size=3, progress=False, log=None)
    assert (s.computed, s.skipped) == (4, 0)
    assert sorted(calls(log)) == [f"i{k:03d}" for k in range(12)]
    assert _files(out) == good  # recomputed to identical bytes (per-item seeds)


def test_a_shard_failing_on_every_retry_is_named_and_the_others_finish(tmp_path):
    out, log = tmp_path / "out", tmp_path / "calls.txt"
    with pytest.raises(BatchError) as info:
        run_job(ToyJob(10, fail_keys=("i004",), calls_file=str(log)), out, shard_size=3, retries=2,
                progress=False, log=None)
    msg = str(info.value)
    assert "i004" in msg and "3 attempt(s)" in msg and "toy failure on i004" in msg and "other 7 item(s)" in msg
    assert calls(log).count("i004") == 3  # 1 + 2 retries
    rows = json.loads((out / "index.json").read_text())
    assert not rows["complete"] and len(rows["rows"]) == 7 and "i004" not in [r["key"] for r in rows["rows"]]
    # the fix: the rerun computes only the failed shard
    open(log, "w").close()
    s = run_job(ToyJob(10, calls_file=str(log)), out, shard_size=3, progress=False, log=None)
    assert s.computed == 1 and sorted(calls(log)) == ["i003", "i004", "i005"]


def test_a_full_disk_is_named_and_finished_shards_are_kept(tmp_path, monkeypatch):
    """ENOSPC from fsync on the 4th file (simulated: a real full filesystem would need a mount)."""
    out = tmp_path / "out"
    real_fsync, count = os.fsync, {"n": 0}

    def fsync(fd):
        count["n"] += 1
        if count["n"] >= 6:  # batch.json, then shard 0: 3 files + record, then shard 1's first file fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(BatchDiskFullError, match=rf"output folder {out} is full .*every shard finished before is kept"):
        run_job(ToyJob(9), out, shard_size=3, progress=False, log=None)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not [p for p in out.rglob(".*tmp-*")]  # no temp file left behind
    s = run_job(ToyJob(9), out, shard_size=3, progress=False, log=None)
    assert (s.skipped, s.computed) == (1, 2)


def test_parts_of_a_job_array_cover_the_plan(tmp_path):
    out, log = tmp_path / "out", tmp_path / "calls.txt"
    a = run_job(ToyJob(10, calls_file=str(log)), out, shard_size=2, part=(0, 2), progress=False, log=None)
    assert a.computed == 2 and not json.loads((out / "index.json").read_text())["complete"]
    b = run_job(ToyJob(10, calls_file=str(log)), out, shard_size=2, part=(1, 2), progress=False, log=None)
    assert b.computed == 3 and sorted(calls(log)) == [f"i{k:03d}" for k in range(10)]
    assert json.loads((out / "index.json").read_text())["complete"]


def test_the_local_engine_never_imports_ray(tmp_path):
    code = ("import sys; sys.path.insert(0, 'tests'); from batch_jobs import ToyJob\n"
            "from brain_diffuser_core.batch import run_job\n"
            f"run_job(ToyJob(4), {str(tmp_path / 'o')!r}, shard_size=2, progress=False, log=None)\n"
            "assert 'ray' not in sys.modules, 'the local engine imported ray'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_ray_address_that_does_not_answer_is_named_with_the_time_waited(tmp_path, capsys):
    from app_sources import free_port
    from brain_diffuser_core.__main__ import main

    port = free_port()  # nothing listens there
    rc = main(["sweep", "--bundle", str(tmp_path), "--nsd-root", str(tmp_path), "--patterns", "V1",
               "--out", str(tmp_path / "o"), "--engine", "ray", "--ray-address", f"127.0.0.1:{port}",
               "--ray-timeout", "1.5"])
    err = capsys.readouterr().err
    assert rc == 3 and f"no Ray cluster answers at --ray-address 127.0.0.1:{port}" in err
    waited = float(err.split(" s of trying")[0].rsplit(" in ", 1)[1])
    assert 1.5 <= waited < 10
    assert "ray" not in sys.modules or True  # the probe runs before Ray is imported (see ray_engine.start)


# ------------------------------------------------------------------------------------------------ sweep
def sweep_args(sources, out, *extra):
    bundle, world, cache = sources
    return ["sweep", "--bundle", bundle, "--nsd-root", world, "--cache-dir", cache, "--steps", "4",
            "--threads", "1", "--no-progress", "--out", str(out), *extra]


def test_sweep_writes_the_pipelines_scenes_and_resumes(batch_sources, tmp_path, capsys):
    from PIL import Image

    from brain_diffuser_core.__main__ import main
    from brain_diffuser_core.export import png_bytes
    from brain_diffuser_core.nsd import load_subject
    from brain_diffuser_core.patterns import pattern_to_json
    from brain_diffuser_core.pipeline import BrainDiffuser
    from brain_diffuser_core.seeding import seed_for

    bundle, world, cache = batch_sources
    mine = tmp_path / "mine.json"
    mine.write_text(pattern_to_json("my faces left", {"faces": 1.0, "V1": 0.5}, "left"))
    out = tmp_path / "sweep"
    args = sweep_args(batch_sources, out, "--patterns", f"faces,V1-V4+places,{mine}", "--subjects", "1,average",
                      "--seeds", "2", "--shard-size", "3")
    assert main(args) == 0
    rows = json.loads((out / "index.json").read_text())["rows"]
    assert [(r["pattern"], r["subject"], r["k"]) for r in rows] == [
        (p, s, k) for p in ("faces", "V1-V4+places", "my_faces_left") for s in ("1", "average") for k in (0, 1)]
    for r in rows:
        assert r["seed"] == seed_for("pattern", f"sweep/{r['pattern']}/{r['subject']}", r["k"])
        assert (out / r["file:final"]).is_file() and (out / r["file:stage1"]).is_file()
    assert "12 of 12 items" in capsys.readouterr().out
    final = np.asarray(Image.open(out / rows[0]["file:final"]))
    stage1 = np.asarray(Image.open(out / rows[0]["file:stage1"]))
    assert final.dtype == np.uint8 and final.ndim == 3 and final.shape[2] == 3 and final.std() > 0
    assert final.shape[0] >= stage1.shape[0] and not np.array_equal(final, stage1)  # stage 2 changed the image
    # the same scene straight from the pipeline, as the ROI designer makes it
    sub = load_subject(world, 1, cache_dir=cache, progress=False)
    bd = BrainDiffuser(bundle, device="cpu")
    r = rows[1]
    rec = bd.reconstruct_pattern({1: sub.synthetic_pattern({"faces": 1.0})}, name="sweep/faces/1",
                                 seeds=[r["seed"]], num_inference_steps=4)[0]
    assert (out / r["file:final"]).read_bytes() == png_bytes(rec.final)
    # a rerun computes nothing; a lost shard is recomputed to identical bytes
    lost = sorted((out / "images/my_faces_left/average").glob("*_final.png"))
    old = [p.read_bytes() for p in lost]
    (out / "shards/shard-00003.json").unlink()
    for p in lost:
        p.unlink()
    assert main(args) == 0
    assert "1 shard(s) computed, 3 done already" in capsys.readouterr().out
    assert [p.read_bytes() for p in lost] == old
    # other settings into the same folder: refused, named
    assert main(sweep_args(batch_sources, out, "--patterns", f"faces,V1-V4+places,{mine}", "--subjects",
                           "1,average", "--seeds", "2", "--shard-size", "3", "--strength", "0.5")) == 2
    assert "strength" in capsys.readouterr().err


def test_sweep_refuses_unknown_patterns_and_subjects(batch_sources, tmp_path, capsys):
    from brain_diffuser_core.__main__ import main

    assert main(sweep_args(batch_sources, tmp_path / "o", "--patterns", "FFA-9", "--subjects", "1")) == 2
    assert "'FFA-9' is neither a catalogue ROI" in capsys.readouterr().err
    assert main(sweep_args(batch_sources, tmp_path / "o", "--patterns", "V1", "--subjects", "7")) == 2
    assert "must be one of the bundle's subjects [1, 2]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("template,fill", [("ray-symmetric.sbatch", {}),
                                           ("array.sbatch", {"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT": "3/16"})])
def test_the_slurm_templates_are_valid_bash_and_pass_real_cli_options(template, fill):
    """Not a SLURM run (see deploy/slurm/README.md): the script parses, and the options it adds to a command are
    ones the CLI accepts, for both kinds of batch command."""
    import shlex

    from brain_diffuser_core.__main__ import build_parser

    path = ROOT / "deploy/slurm" / template
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if '-m brain_diffuser_core "$@"' in ln)
    added = line.split('"$@"', 1)[1]
    for k, v in fill.items():
        added = added.replace(f'"{k}"', v)
    added = shlex.split(added)
    for command in (["sweep", "--bundle", "b", "--nsd-root", "r", "--patterns", "V1", "--out", "o"],
                    ["reconstruct", "--bundle", "b", "--nsd-root", "r", "--subject", "1", "--out", "o"]):
        ns = build_parser().parse_args(command + added)
        assert ns.engine == "ray"
        assert ns.ray_address == ("auto" if template == "ray-symmetric.sbatch" else None)
        assert ns.part == (None if template == "ray-symmetric.sbatch" else "3/16")


def test_the_roi_designer_pages_through_a_sweep_folder(batch_sources, app, tmp_path):
    from brain_diffuser_core.__main__ import main

    out = tmp_path / "sweep"
    assert main(sweep_args(batch_sources, out, "--patterns", "V1,faces", "--subjects", "1", "--seeds", "7",
                           "--stage1-only")) == 0
    app.session_state["roi_results_folder"] = str(out)
    app.run()
    assert not app.exception, [str(e.value) for e in app.exception]
    assert any("`sweep`: 14 of 14 items (complete); images: stage1" in c.value for c in app.caption)
    captions = [c for img in app.get("image") for c in img.captions]
    seeds = [r["seed"] for r in json.loads((out / "index.json").read_text())["rows"]]
    # (the tree lists the grid column by column: compare as sets)
    assert sorted(c for c in captions if c.startswith("V1 | 1 | seed")) == sorted(f"V1 | 1 | seed {s}" for s in seeds[:7])
    assert len([c for c in captions if "| seed" in c]) == 12  # one page
    app.selectbox(key="roi_results_pattern").set_value("faces").run()
    captions = [c for img in app.get("image") for c in img.captions if "| seed" in c]
    assert sorted(captions) == sorted(f"faces | 1 | seed {s}" for s in seeds[7:])


def test_the_reader_lists_a_reconstruct_folder_and_refuses_other_folders(tmp_path):
    from brain_diffuser_core.batch.reader import open_results

    run_job(ToyJob(5), tmp_path / "toy", shard_size=2, progress=False, log=None)
    res = open_results(tmp_path / "toy")
    assert res.kind == "toy" and res.complete and [r["key"] for r in res.rows] == [f"i{k:03d}" for k in range(5)]
    assert res.kinds() == ["vec"] and res.image_path(res.rows[0], "vec") == tmp_path / "toy/out/i000_vec.bin"
    page, n_pages = res.page(res.rows, 2, 2)
    assert n_pages == 3 and [r["key"] for r in page] == ["i004"]
    (tmp_path / "toy/shards/shard-00002.json").write_text("{trunc")  # a record being written: not finished
    assert not open_results(tmp_path / "toy").complete
    with pytest.raises(ValueError, match="holds no batch results"):
        open_results(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        open_results(tmp_path / "nope")


def test_a_folder_with_nothing_finished_takes_new_settings(tmp_path):
    out = tmp_path / "out"
    run_job(ToyJob(0), out, shard_size=3, progress=False, log=None)  # a manifest, no shard
    s = run_job(ToyJob(3, scale=2.0), out, shard_size=3, progress=False, log=None)
    assert s.computed == 1 and json.loads((out / "batch.json").read_text())["settings"]["scale"] == 2.0


def test_extract_on_the_batch_layer_matches_the_library_and_resumes(batch_sources, tmp_path, capsys):
    import torch

    from brain_diffuser_core.__main__ import main
    from brain_diffuser_core.bundle import load_bundle
    from brain_diffuser_core.features.clip import ClipFeatureExtractor
    from brain_diffuser_core.features.extract import extract_features
    from brain_diffuser_core.features.store import FeatureStore
    from brain_diffuser_core.features.vdvae import load_vdvae
    from brain_diffuser_core.nsd import load_subject

    bundle, world, cache = batch_sources
    models = load_bundle(bundle).models
    vdvae, vd = models["vdvae"]["path"], models["versatile_diffusion"]["path"]
    out = tmp_path / "feats"
    args = ["extract", "--nsd-root", world, "--subject", "1", "--out", str(out), "--vdvae", vdvae, "--clip", vd,
            "--device", "cpu", "--cache-dir", cache, "--split", "test", "--batch-size", "2", "--shard-size", "4",
            "--threads", "1", "--no-progress", "--dtype", "float32"]
    assert main(args) == 0
    batch = FeatureStore(out)
    ref_dir = tmp_path / "ref"
    sub = load_subject(world, 1, cache_dir=cache, progress=False)
    torch.set_num_threads(1)
    extract_features(sub, ref_dir, vdvae=load_vdvae(vdvae, device="cpu"),
                     clip=ClipFeatureExtractor.from_pretrained(vd, device="cpu"), splits=["test"], batch_size=2,
                     dtype="float32")
    ref = FeatureStore(ref_dir)
    ids = ref.ids("vdvae")
    assert sorted(batch.names()) == sorted(ref.names()) and np.array_equal(batch.ids("vdvae"), ids)
    for name in ref.names():
        np.testing.assert_array_equal(batch.get(name, ids), ref.get(name, ids))
    capsys.readouterr()
    assert main(args) == 0 and "0 to run" in capsys.readouterr().out
    # a folder of features written without the batch layer is refused (its shard numbers would collide)
    assert main([*args[:6], str(ref_dir), *args[7:]]) == 2
    assert "written without the batch layer" in capsys.readouterr().err


def test_gpus_asked_of_a_cluster_without_any_are_refused_before_anything_is_written(batch_sources, tmp_path,
                                                                                    capsys, monkeypatch):
    """The ray engine's resource check, against the resources a GPU-less cluster reports (the real
    two-node cluster of tests/test_batch_ray.py reports the same {CPU: 2, GPU: 0})."""
    import ray

    from brain_diffuser_core.__main__ import main
    from brain_diffuser_core.batch.ray_engine import RayEngine

    def start(self):  # "connected": the cluster is the resources below
        self._started = True

    monkeypatch.setattr(RayEngine, "start", start)
    monkeypatch.setattr(RayEngine, "close", lambda self: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 2e9})
    out = tmp_path / "gpu"
    rc = main(sweep_args(batch_sources, out, "--patterns", "V1", "--subjects", "1", "--engine", "ray",
                         "--ray-address", "auto", "--device", "cuda"))
    err = capsys.readouterr().err
    assert rc == 3 and "asks for 1 GPU(s) per worker (--device cuda)" in err and "has 0 GPU(s)" in err
    assert "--num-gpus" in err and not out.exists()


def test_shards_in_flight_reaches_the_ray_engine_and_zero_is_refused():
    """--shards-in-flight (default 2: an actor never idles waiting for the driver between shards) is what the
    ray engine hands Ray Data's actor pool; below 1 is refused before Ray starts."""
    import argparse

    from brain_diffuser_core.cli._engine import add_engine_arguments, make_engine

    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    assert make_engine(p.parse_args(["--engine", "ray"])).shards_in_flight == 2
    assert make_engine(p.parse_args(["--engine", "ray", "--shards-in-flight", "1"])).shards_in_flight == 1
    with pytest.raises(ValueError, match="shards_in_flight must be >= 1, got 0"):
        make_engine(p.parse_args(["--engine", "ray", "--shards-in-flight", "0"]))
