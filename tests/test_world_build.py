"""MiniNSD world builder: an NSD tree that load_subject reads unchanged, with the observer's ground truth."""
import gzip
import json
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from brain_diffuser_core.__main__ import main
from brain_diffuser_core.nsd import NSDFormatError, load_subject
from brain_diffuser_core.nsd_format import NSDPaths, write_stimuli_hdf5
from brain_diffuser_core.seeding import seed_for
from brain_diffuser_core.world import build as wb
from brain_diffuser_core.world.observer import Observer
from brain_diffuser_core.world.scenes import CATEGORIES, generate_scenes

SMALL = dict(n_train=60, n_test=12, subjects=(1, 2), seed=0)
N_IMAGES = 72


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("w") / "mini"
    steps = []
    info = wb.build_world(root, progress=lambda s, d, t: steps.append((s, d, t)), **SMALL)
    return info, steps


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(N_IMAGES, seed=0)  # the world's images, by 73k id


@pytest.fixture(scope="module")
def subjects(world, tmp_path_factory):
    info, _ = world
    cache = tmp_path_factory.mktemp("cache")
    return {s: load_subject(info.root, s, cache_dir=cache, progress=False) for s in (1, 2)}


def test_load_subject_reads_the_world(world, subjects, scenes):
    info, steps = world
    assert info.n_sessions == 1 and info.n_trials == 750 and info.n_images == N_IMAGES
    assert [d for _, d, _ in steps] == list(range(1, len(steps) + 1)) and steps[-1][1] == steps[-1][2]
    for s, sub in subjects.items():
        # test ids are exactly the world's test images, train ids the rest
        assert np.array_equal(sub.test_image_ids, np.arange(12))
        assert np.array_equal(sub.train_image_ids, np.arange(12, N_IMAGES))
        assert sub.sessions_used == (1,)
        assert sub.n_voxels == info.n_voxels[s] == Observer(s).n_voxels
        assert sub.volume_shape == (36, 24, 20)
        assert np.isfinite(sub.train_fmri).all() and sub.train_fmri.dtype == np.float32
    sub = subjects[1]
    for i in (0, 11, 12, 71):
        img = sub.image(i)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert np.array_equal(img, scenes[i].image)
        assert sub.captions(i) == scenes[i].captions
    assert not sub.image(N_IMAGES).any()  # no world image there: an unwritten chunk reads as zeros


def test_design_follows_nsd_rules(world):
    info, _ = world
    mat = scipy.io.loadmat(NSDPaths(info.root, 1).expdesign)
    mo, subjectim, sharedix = mat["masterordering"][0], mat["subjectim"], mat["sharedix"][0]
    assert mo.shape == (30000,) and subjectim.shape == (8, 10000) and sharedix.shape == (1000,)
    assert np.array_equal(sharedix[:12], np.arange(1, 13)) and sharedix.min() >= 1
    for s in (1, 2):
        ids = subjectim[s - 1, mo[:750] - 1] - 1  # 0-based 73k id of each trial of session 1
        test = mo[:750] <= 1000
        assert np.array_equal(np.sort(np.unique(ids[test])), np.arange(12))
        assert np.array_equal(np.bincount(ids[test], minlength=12), np.full(12, 3))  # test_repeats
        assert np.array_equal(np.unique(ids[~test]), np.arange(12, N_IMAGES))  # every train image shown
    # subjects see the train images in different orders
    assert not np.array_equal(subjectim[0, 1000:1060], subjectim[1, 1000:1060])
    assert not np.array_equal(mo[:750], np.sort(mo[:750]))  # shuffled


def test_betas_are_the_observer_responses_times_300(world, scenes):
    info, _ = world
    paths = NSDPaths(info.root, 2)
    mat = scipy.io.loadmat(paths.expdesign)
    trials = np.array([0, 5, 749])
    ids = mat["subjectim"][1, mat["masterordering"][0, trials] - 1] - 1
    obs = Observer(2)
    expected = obs.responses([scenes[i] for i in ids], seeds=[seed_for("trial", 2, int(t)) for t in trials])
    img = nib.load(paths.betas_nifti(1))
    assert img.shape == (36, 24, 20, 750) and img.get_data_dtype() == np.int16
    betas = np.asanyarray(img.dataobj)
    i, j, k = obs.voxel_ijk.T
    got = betas[i, j, k][:, trials].T / 300.0
    assert np.abs(got - expected).max() <= 0.5 / 300 + 1e-6
    gen = np.asanyarray(nib.load(paths.nsdgeneral).dataobj)
    assert set(np.unique(gen)) == {-1, 0, 1} and (gen == 1).sum() == obs.n_voxels
    assert not betas[gen != 1].any()


def test_sessions_hold_exactly_the_per_trial_recipe_and_nibabels_bytes(world, subjects, scenes):
    """The build computes noise-free responses once per image and writes F-ordered volumes with its own gzip
    stream; the files must still decode to exactly what the per-trial recipe (``obs.responses`` of each
    trial's image with its seed, x 300, rounded to int16) gives, as the bytes nibabel writes for that array."""
    from brain_diffuser_core.world.channels import scene_features

    info, _ = world
    feats = scene_features(scenes)
    for s in (1, 2):
        paths = NSDPaths(info.root, s)
        mat = scipy.io.loadmat(paths.expdesign)
        obs = Observer(s)
        i, j, k = obs.voxel_ijk.T
        for session in range(1, info.n_sessions + 1):
            trials = np.arange((session - 1) * 750, session * 750)
            ids = mat["subjectim"][s - 1, mat["masterordering"][0, trials] - 1] - 1
            assert len(np.unique(ids)) < len(ids)  # images repeat within the session
            resp = obs.responses(feats[ids], seeds=[seed_for("trial", s, int(t)) for t in trials])
            want = np.zeros((36, 24, 20, 750), np.int16)
            want[i, j, k, :] = np.clip(np.rint(resp * 300), -32768, 32767).astype(np.int16).T
            raw = paths.betas_nifti(session).read_bytes()
            assert raw[:2] == b"\x1f\x8b"  # a gzip member, as NSD's .nii.gz
            img = nib.Nifti1Image(want, nib.load(paths.betas_nifti(session)).affine)
            img.header.set_data_dtype(np.int16)
            img.header.set_xyzt_units("mm", "sec")
            assert gzip.decompress(raw) == img.to_bytes()
            assert np.array_equal(np.asanyarray(nib.load(paths.betas_nifti(session)).dataobj), want)
    for i in range(N_IMAGES):  # the stimuli too
        assert np.array_equal(subjects[1].image(i), scenes[i].image)


def test_observer_add_noise_is_responses_split_in_two():
    obs = Observer(5)
    scenes_ = generate_scenes(20, seed=3)
    from brain_diffuser_core.world.channels import scene_features

    feats = scene_features(scenes_)
    ids = np.array([0, 3, 3, 19, 0, 7])
    seeds = [seed_for("trial", 5, t) for t in range(len(ids))]
    mean = obs.responses(feats, noise=False)
    got = obs.add_noise(mean[ids], seeds=seeds)
    assert got.dtype == np.float32 and got.shape == (6, obs.n_voxels)
    assert np.array_equal(got, obs.responses(feats[ids], seeds=seeds))
    assert not np.array_equal(got[1], got[2])  # the same image, two trials: different noise
    with pytest.raises(ValueError, match="float32"):
        obs.add_noise(mean.astype(np.float64), seeds=seeds[:1])


def test_rois_and_ground_truth_line_up_with_the_subject(world, subjects):
    info, _ = world
    sub = subjects[1]
    tuning = np.load(info.root / "world" / "tuning_subj01.npz", allow_pickle=False)
    assert np.array_equal(tuning["voxel_ijk"], sub.voxel_ijk)
    faces = sub.synthetic_pattern({"faces": 1.0})
    assert faces.sum() > 20
    assert np.array_equal(faces == 1, tuning["area"] == "faces")  # the pattern hits the observer's face voxels
    assert set(tuning["preferred"][faces == 1]) == {"face"}
    v1 = sub.roi_mask("V1")
    assert set(tuning["area"][v1]) == {"V1"}


def test_surface_files_put_each_voxel_on_its_vertex(world, subjects, tmp_path):
    """The world's NSD-format transforms (read by the same code as real NSD) place each voxel exactly on the
    observer's fsaverage5 vertex, hemispheres come from lh/rh.nsdgeneral, and the surface labels equal the voxel
    ROI masks at those vertices."""
    import nibabel as nib

    from brain_diffuser_core import nsd_surface

    info, _ = world
    sub = subjects[1]
    obs = Observer(1)
    order = np.asarray(np.load(info.root / "world" / "tuning_subj01.npz")["observer_index"])
    paths = info.paths(1)
    assert nsd_surface.missing_transform_files(paths) == []
    img = nib.load(paths.layer_coords("lh", "layerB2"))
    assert img.shape == (10242, 1, 1, 3) and img.get_data_dtype() == np.dtype(">f4")
    hemi = nsd_surface.hemispheres_from_nsdgeneral(paths, sub.voxel_ijk)
    assert np.array_equal(hemi, obs.hemisphere[order].astype(str))
    smap = nsd_surface.load_surface_map(paths, sub.voxel_ijk, sub.volume_shape, cache_dir=tmp_path)
    pattern = np.random.default_rng(0).normal(size=sub.n_voxels)
    maps = smap.project(pattern)
    vidx = obs.vertex_index[order]
    for h in ("left", "right"):
        sel = hemi == h
        np.testing.assert_allclose(maps[h][vidx[sel]], pattern[sel], atol=1e-5)
        assert np.isnan(maps[h]).sum() == 10242 - sel.sum()  # every other vertex: no value
    outlines, notes = nsd_surface.roi_outlines(paths, smap, ["V1", "faces"], sub.roi_mask)
    assert notes == []
    for roi in ("V1", "faces"):
        mask = sub.roi_mask(roi)
        for h in ("left", "right"):
            sel = hemi == h
            assert set(np.flatnonzero(outlines[roi][h])) == set(vidx[sel & mask].tolist())


def test_train_fmri_predicts_the_scene_category(world, subjects):
    info, _ = world
    labels = np.load(info.root / "world" / "image_labels.npy")
    images = json.loads((info.root / "world" / "images.json").read_text())
    assert images["categories"] == list(CATEGORIES)
    assert [r["label"] for r in images["images"]] == labels.tolist()
    assert [r["split"] for r in images["images"][11:13]] == ["test", "train"]
    for sub in subjects.values():
        X, Xt = sub.train_fmri.astype(np.float64), sub.test_fmri.astype(np.float64)
        Y = np.eye(len(CATEGORIES))[labels[sub.train_image_ids]]
        # kernel ridge (n_train < n_voxels): W = X^T (X X^T + a I)^-1 Y
        a = 1e3
        pred = Xt @ X.T @ np.linalg.solve(X @ X.T + a * np.eye(len(X)), Y)
        acc = (pred.argmax(1) == labels[sub.test_image_ids]).mean()
        assert acc >= 0.75, acc  # chance is 1/6


def test_two_builds_give_identical_files(world, subjects, tmp_path):
    info, _ = world
    again = wb.build_world(tmp_path / "again", **SMALL)
    assert again.files == info.files  # every file byte-identical (sha256), the .mat and .hdf5 included
    a = scipy.io.loadmat(NSDPaths(again.root, 1).expdesign)
    assert np.array_equal(a["subjectim"], scipy.io.loadmat(NSDPaths(info.root, 1).expdesign)["subjectim"])
    s1 = load_subject(again.root, 1, cache_dir=tmp_path / "c", progress=False)
    assert np.array_equal(s1.train_fmri, subjects[1].train_fmri)
    other = wb.build_world(tmp_path / "seed1", **{**SMALL, "seed": 1, "subjects": (1,)})
    key = "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session01.nii.gz"
    assert other.files[key]["sha256"] != info.files[key]["sha256"]


def test_world_json_versions_and_checksums(world, tmp_path):
    info, _ = world
    root = tmp_path / "copy"
    shutil.copytree(info.root, root)
    params = wb.world_params(**SMALL)
    assert wb.world_is_current(root, params) and wb.verify_world(root) == []
    assert not wb.world_is_current(root, {**params, "n_test": 13})
    assert not wb.world_is_current(root)  # default parameters differ
    cap = root / "nsddata_stimuli/stimuli/nsd/annotations/COCO_73k_annots_curated.npy"
    with open(cap, "r+b") as f:
        f.seek(200)
        f.write(b"X")
    assert wb.verify_world(root) == ["nsddata_stimuli/stimuli/nsd/annotations/COCO_73k_annots_curated.npy"]
    d = json.loads((root / "world.json").read_text())
    d["version"] = wb.WORLD_FORMAT_VERSION - 1
    (root / "world.json").write_text(json.dumps(d))
    assert not wb.world_is_current(root, params)
    (root / "world.json").unlink()
    assert not wb.world_is_current(root, params)
    with pytest.raises(FileNotFoundError, match="no MiniNSD world"):
        wb.read_world_info(root)


def test_ensure_world_builds_once_and_rebuilds_stale(tmp_path):
    small = dict(n_train=30, n_test=6, subjects=[1])
    root = wb.ensure_world(tmp_path, **small)
    assert root == tmp_path / f"mininsd-v{wb.WORLD_FORMAT_VERSION}"
    stamp = (root / "world.json").stat().st_mtime_ns
    assert wb.ensure_world(tmp_path, **small) == root
    assert (root / "world.json").stat().st_mtime_ns == stamp  # current: not rebuilt
    # an older format version is rebuilt, not misread
    d = json.loads((root / "world.json").read_text())
    d["version"] = 0
    (root / "world.json").write_text(json.dumps(d))
    steps = []
    wb.ensure_world(tmp_path, progress=lambda *a: steps.append(a), **small)
    assert steps and wb.read_world_info(root).version == wb.WORLD_FORMAT_VERSION
    # other parameters: rebuilt with them
    wb.ensure_world(tmp_path, **{**small, "n_test": 7})
    assert wb.read_world_info(root).params["n_test"] == 7
    sub = load_subject(root, 1, cache_dir=tmp_path / "c", progress=False)
    assert np.array_equal(sub.test_image_ids, np.arange(7))
    with pytest.raises(ValueError, match="ensure_world parameters must be among"):
        wb.ensure_world(tmp_path, n_trian=5)


def test_a_failing_build_leaves_nothing_complete_looking(tmp_path, monkeypatch):
    calls = []
    real = wb.write_betas_nifti

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(wb, "write_betas_nifti", full_disk)
    with pytest.raises(OSError, match="No space left"):
        wb.build_world(tmp_path / "w", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder
    # over an existing world, a failed rebuild keeps the old one intact
    monkeypatch.setattr(wb, "write_betas_nifti", real)
    wb.build_world(tmp_path / "w", n_train=30, n_test=6, subjects=(1,))
    calls.clear()
    monkeypatch.setattr(wb, "write_betas_nifti", full_disk)
    with pytest.raises(OSError):
        wb.build_world(tmp_path / "w", **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["w"]
    assert wb.world_is_current(tmp_path / "w", dict(n_train=30, n_test=6, subjects=[1]))
    assert wb.verify_world(tmp_path / "w") == []


def test_observer_label_tables_come_from_the_roi_catalogue():
    from brain_diffuser_core.rois import ROI_CATALOGUE
    from brain_diffuser_core.world.observer import ROI_TABLES

    single = [spec for spec in ROI_CATALOGUE.values() if spec.group in ("fine", "eccentricity")]
    assert sum(len(t) for f, t in ROI_TABLES.items() if f != "nsdgeneral") == len(single) == 29
    for spec in single:
        assert ROI_TABLES[spec.file][spec.labels[0]] == spec.name


def test_bad_parameters_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"'n_test' must be an integer in \[1, 1000\]; 1001 was provided"):
        wb.build_world(tmp_path / "w", n_test=1001)
    with pytest.raises(ValueError, match=r"'subjects' must be distinct values from \[1, 2, 5, 7\]; \[3\]"):
        wb.build_world(tmp_path / "w", subjects=(3,))
    with pytest.raises(ValueError, match="must fit 37 sessions of 750 trials; 45001 trials"):
        wb.build_world(tmp_path / "w", n_train=9000, train_repeats=5, n_test=1, test_repeats=1)
    assert not (tmp_path / "w").exists()


def test_reader_takes_any_square_brick_and_rejects_others(world, subjects, tmp_path):
    sub = subjects[1]
    other = NSDPaths(tmp_path, 1)
    img = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    write_stimuli_hdf5(other.stimuli, {3: img}, n_stimuli=10, image_size=32)
    sub.paths = other
    assert np.array_equal(sub.image(3), img)
    with pytest.raises(NSDFormatError, match=r"'imgBrick' must have shape \(n_images > 10, S, S, 3\)"):
        sub.image(10)
    with h5py.File(other.stimuli, "w") as f:
        f.create_dataset("imgBrick", shape=(10, 32, 16, 3), dtype=np.uint8)
    with pytest.raises(NSDFormatError, match=r"square images .*found \(10, 32, 16, 3\)"):
        sub.image(0)
    with pytest.raises(ValueError, match=r"image 0 must be uint8 \(10, 10, 3\)"):
        write_stimuli_hdf5(other.stimuli, {0: img}, n_stimuli=10, image_size=10)


def test_cli_build_prints_time_and_size_and_skips_a_current_world(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["world", "build", "--out", str(out), "--n-train", "30", "--n-test", "6", "--subjects", "1",
            "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "images         36 (30 train, 6 test x 3 repeats)" in text
    assert "MB" in text and "time" in text and "subj01" in text
    assert wb.read_world_info(out).params["subjects"] == [1]
    assert main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["world", "build", "--out", str(out), "--subjects", "1,x"]) == 2
    assert "'--subjects' must be a comma-separated list" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["world", "build", "--help"])
    assert exc.value.code == 0
    assert "--n-train" in capsys.readouterr().out
    assert main(["world"]) == 0
    assert "build" in capsys.readouterr().out
