"""`fit`, `evaluate` and `world validate` on the batch layer (local engine), on the tiny 2-subject world of
tests/batch_sources.py: each writes what its direct library path writes, a rerun skips finished shards, other
settings are refused, and a planted partial shard file is recomputed, not taken as done.

(The ray engine runs the same jobs through :func:`brain_diffuser_core.batch.run_shard`: tests/test_batch_ray.py.)
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from brain_diffuser_core.__main__ import main


def _computed(text: str) -> tuple[int, int]:
    """(shards computed, shards done already) from the batch summary line a command prints."""
    m = re.search(r"(\d+) shard\(s\) computed, (\d+) done already", text)
    assert m, text[-2000:]
    return int(m.group(1)), int(m.group(2))


def _tree(folder: Path, pattern: str = "*") -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob(pattern)) if p.is_file()}


# ------------------------------------------------------------------------------------------------ evaluate
def test_evaluate_on_the_batch_layer_writes_what_evaluate_bundle_writes_and_resumes(batch_sources, tmp_path, capsys):
    from brain_diffuser_core.evaluation import evaluate_bundle, world_category_score, write_subject_mean
    from brain_diffuser_core.nsd import load_subject
    from brain_diffuser_core.pipeline import BrainDiffuser

    bundle, world, cache = batch_sources
    out = tmp_path / "eval"
    args = ["evaluate", "--bundle", bundle, "--nsd-root", world, "--cache-dir", cache, "--subject", "1,2",
            "--trials", "0-4", "--steps", "2", "--networks", "", "--device", "cpu", "--judge-scenes", "2",
            "--batch-size", "2", "--shard-size", "2", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert _computed(printed) == (6, 0)  # 5 rows per subject in shards of 2: 3 per subject, none across subjects
    # the direct path (the command before the batch layer), into another folder
    ref = tmp_path / "ref"
    bd = BrainDiffuser(bundle, device="cpu")
    judge = world_category_score(world, cache, n_per_category=2)
    summaries = {}
    for s in (1, 2):
        sub = load_subject(world, s, cache_dir=cache, progress=False)
        summaries[s] = evaluate_bundle(bd, sub, ref / f"subj{s:02d}", rows=range(5), networks=(), batch_size=2,
                                       category_judge=judge, num_inference_steps=2)
    write_subject_mean(ref, summaries)
    for name in ("metrics.json", "table.md", "subj01/metrics.json", "subj01/metrics.csv", "subj01/per_image.csv",
                 "subj02/per_image.csv", "subj02/table.md"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    images = _tree(out, "*.png")
    assert len(images) == 2 * 5 * 3 and images == _tree(ref, "*.png")  # subjects x rows x variants, same bytes

    # a rerun computes nothing and rewrites the same tables
    assert main(args) == 0 and _computed(capsys.readouterr().out) == (0, 6)
    assert (out / "metrics.json").read_bytes() == (ref / "metrics.json").read_bytes()
    # a planted partial image (truncated under its final name): its shard is recomputed to the same bytes
    png = out / "subj02/images/full" / Path(sorted(images)[-1]).name
    good = png.read_bytes()
    png.write_bytes(good[: len(good) // 2])
    assert main(args) == 0 and _computed(capsys.readouterr().out) == (1, 5)
    assert png.read_bytes() == good
    # other generation settings into the same folder: refused, the setting named, nothing changed
    assert main([*args, "--seed", "1"]) == 2
    assert "seed: 0 there, 1 now" in capsys.readouterr().err
    assert _tree(out, "*.png") == images


# ------------------------------------------------------------------------------------------ world validate
def test_world_validate_on_the_batch_layer_writes_validate_bundles_report_and_resumes(batch_sources, tmp_path,
                                                                                      capsys):
    from brain_diffuser_core.pipeline import BrainDiffuser
    from brain_diffuser_core.world.validate import validate_bundle

    bundle, world, cache = batch_sources
    out = tmp_path / "validate"
    args = ["world", "validate", "--bundle", bundle, "--world", world, "--cache-dir", cache, "--rois", "faces,V1",
            "--subjects", "1,average", "--seeds", "3", "--steps", "2", "--judge-scenes", "3", "--calibration", "24",
            "--batch-size", "2", "--shard-size", "2", "--device", "cpu", "--threads", "1", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    assert _computed(capsys.readouterr().out) == (8, 0)  # 2 rois x 2 subjects, 3 seeds each in shards of 2
    ref = validate_bundle(BrainDiffuser(bundle, device="cpu"), world, rois=["faces", "V1"], subjects=[1, "average"],
                          n_seeds=3, judge_scenes=3, n_calibration=24, batch_size=2, cache_dir=cache,
                          num_inference_steps=2)
    ref.write(tmp_path / "ref")
    report = json.loads((out / "report.json").read_text())
    assert len(report["records"]) == 12
    for name in ("report.json", "per_seed.csv", "summary.csv", "sheets/faces.png", "sheets/V1.png"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    seeds = [r["seed"] for r in report["records"]]
    index = json.loads((out / "index.json").read_text())["rows"]
    assert [r["seed"] for r in index] == seeds and len(set(seeds)) == 12

    # a rerun computes nothing; a shard whose record is lost and whose image is garbage is recomputed
    assert main(args) == 0 and _computed(capsys.readouterr().out) == (0, 8)
    rec = json.loads((out / "shards/shard-00003.json").read_text())
    img = out / next(iter(rec["items"][0]["files"]))
    good = img.read_bytes()
    (out / "shards/shard-00003.json").unlink()
    img.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    assert main(args) == 0 and _computed(capsys.readouterr().out) == (1, 7)
    assert img.read_bytes() == good
    assert (out / "report.json").read_bytes() == (tmp_path / "ref/report.json").read_bytes()
    # other generation settings: refused; a scoring setting (the judge) is not a generation setting
    assert main([*args[:-2], "--steps", "3", "--out", str(out)]) == 2
    assert "num_inference_steps" in capsys.readouterr().err
    assert main([*args, "--judge", "observer"]) == 0 and _computed(capsys.readouterr().out) == (0, 8)
    assert json.loads((out / "report.json").read_text())["judge"] == "observer"


# ------------------------------------------------------------------------------------------------------ fit
@pytest.fixture
def fit_inputs(batch_sources, tmp_path):
    """A feature store with random features for every image of both subjects (fitting needs no truth here)."""
    from brain_diffuser_core.features.store import write_features
    from brain_diffuser_core.nsd import load_subject

    _, world, cache = batch_sources
    ids = np.unique(np.concatenate([np.concatenate([s.train_image_ids, s.test_image_ids]) for s in
                                    (load_subject(world, k, cache_dir=cache, progress=False) for k in (1, 2))]))
    rng = np.random.default_rng(0)
    feats = tmp_path / "feats"
    for name, shape in {"vdvae": (10,), "clip_text": (3, 4), "clip_vision": (5, 4)}.items():
        write_features(feats, name, ids, rng.standard_normal((len(ids), *shape)), dtype="float32")
    return world, cache, feats


def _fit_args(world, cache, feats, out, *extra):
    return ["fit", "--nsd-root", world, "--subject", "1,2", "--features", str(feats), "--out", str(out),
            "--cache-dir", cache, "--alpha-vdvae", "3", "--threads", "1", "--no-progress", *extra]


def _manifest(bundle: Path) -> dict:
    """The manifest less what differs between two writes of the same decoders: the timestamp, and the files'
    checksums (safetensors writes its metadata map in no fixed order: see _decoders for the content)."""
    m = json.loads((bundle / "manifest.json").read_text())
    m.pop("created")
    m["files"] = sorted(m["files"])
    return m


def _decoders(bundle: Path) -> dict:
    """{file: (metadata, {tensor: numpy array})} of every decoder file."""
    from safetensors import safe_open

    out = {}
    for p in sorted(bundle.glob("*.safetensors")):
        with safe_open(str(p), "np") as f:
            out[p.name] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})
    return out


def _same_decoders(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[n][0] == b[n][0] and a[n][1].keys() == b[n][1].keys()
        and all(np.array_equal(a[n][1][k], b[n][1][k]) and a[n][1][k].dtype == b[n][1][k].dtype for k in a[n][1])
        for n in a)


def test_fit_on_the_batch_layer_writes_fit_subject_bundles_bundle(fit_inputs, tmp_path, capsys):
    from brain_diffuser_core.cli.fit import fit_subject_bundle
    from brain_diffuser_core.features.store import FeatureStore
    from brain_diffuser_core.nsd import load_subject

    world, cache, feats = fit_inputs
    out = tmp_path / "bundle"
    assert main(_fit_args(world, cache, feats, out)) == 0
    assert _computed(capsys.readouterr().out) == (2, 0)  # one shard per subject
    assert not Path(f"{out}.fit-work").exists()  # every decoder is in the bundle: the work folder is gone
    ref = tmp_path / "ref"
    for s in (1, 2):
        fit_subject_bundle(load_subject(world, s, cache_dir=cache, progress=False), FeatureStore(feats), ref,
                           alphas={"vdvae": 3.0})
    assert _manifest(out) == _manifest(ref)
    got = _decoders(out)
    assert len(got) == 6 and _same_decoders(got, _decoders(ref))


def test_fit_resumes_by_subject_refuses_other_settings_and_recomputes_a_partial_shard(fit_inputs, tmp_path, capsys):
    world, cache, feats = fit_inputs
    out, work = tmp_path / "bundle", tmp_path / "work"
    args = _fit_args(world, cache, feats, out, "--work", str(work))
    # part 0 of 2 (a job array's first task): subject 1 only, no bundle yet
    assert main([*args, "--part", "0/2"]) == 0
    assert _computed(capsys.readouterr().out) == (1, 0) and not out.exists()
    rows = json.loads((work / "index.json").read_text())
    assert not rows["complete"] and [r["subject"] for r in rows["rows"]] == [1]
    # other settings into the unfinished work folder: refused, nothing mixed in
    assert main([*args, "--alpha-vdvae", "5"]) == 2
    err = capsys.readouterr().err
    assert "alphas" in err and "pass another --work folder" in err and not out.exists()
    # the full run computes only subject 2, then writes the bundle
    assert main([*args, "--keep-work"]) == 0
    assert _computed(capsys.readouterr().out) == (1, 1) and (out / "manifest.json").is_file()
    first, done = _decoders(out), _tree(work / "decoders")
    # a decoder file truncated under its final name (its record intact): that subject is refit, same bytes
    f = work / "decoders/subj02_clip_text.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    assert main([*args, "--keep-work"]) == 0 and _computed(capsys.readouterr().out) == (1, 1)
    assert _tree(work / "decoders") == done and _same_decoders(_decoders(out), first)
    assert main(args) == 0 and _computed(capsys.readouterr().out) == (0, 2) and not work.exists()
