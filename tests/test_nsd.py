import os
import tracemalloc

import h5py
import nibabel as nib
import numpy as np
import pytest

from brain_diffuser_core import nsd as nsd_mod
from brain_diffuser_core.nsd import NSDFormatError, load_subject, mask_checksum, parse_sessions
from brain_diffuser_core.nsd_format import NSDPaths, write_betas_nifti, write_label_volume
from nsd_fixtures import TRIALS, expected_arrays, make_nsd_tree

ARRAYS = ("train_image_ids", "test_image_ids", "train_fmri", "test_fmri", "fmri_mean", "fmri_std")


def _small_tree(tmp_path, **kw):
    kw.setdefault("with_stimuli", False)
    kw.setdefault("with_captions", False)
    kw.setdefault("n_sessions", 2)
    return make_nsd_tree(tmp_path / "nsd", **kw)


def _assert_matches(subject, expected):
    for name in ARRAYS:
        got = getattr(subject, name)
        np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=2e-5, err_msg=name)


# ------------------------------------------------------------------------------------------------ layout
def test_paths_follow_nsd_layout(tmp_path):
    p = NSDPaths(tmp_path, 2)
    assert p.expdesign == tmp_path / "nsddata/experiments/nsd/nsd_expdesign.mat"
    assert p.betas_nifti(7) == tmp_path / (
        "nsddata_betas/ppdata/subj02/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session07.nii.gz"
    )
    assert p.betas_hdf5(37).name == "betas_session37.hdf5"
    assert p.nsdgeneral == tmp_path / "nsddata/ppdata/subj02/func1pt8mm/roi/nsdgeneral.nii.gz"
    assert p.roi_file("floc-faces") == tmp_path / "nsddata/ppdata/subj02/func1pt8mm/roi/floc-faces.nii.gz"
    assert p.stimuli == tmp_path / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
    assert p.surface_label("rh", "prf-visualrois") == tmp_path / "nsddata/freesurfer/subj02/label/rh.prf-visualrois.mgz"
    with pytest.raises(ValueError, match="'subject' must be one of 1..8"):
        NSDPaths(tmp_path, 9)
    with pytest.raises(ValueError, match="'hemi'"):
        p.surface_label("xh", "nsdgeneral")


def test_fixture_files_have_nsd_formats(nsd_tree):
    import scipy.io

    p = nsd_tree.paths
    mat = scipy.io.loadmat(p.expdesign)
    assert mat["masterordering"].shape == (1, 30000)
    assert mat["subjectim"].shape == (8, 10000)
    assert mat["sharedix"].shape == (1, 1000)
    assert mat["masterordering"].min() >= 1 and mat["subjectim"].min() >= 1
    img = nib.load(p.betas_nifti(1))
    assert img.shape == nsd_tree.volume_shape + (TRIALS,)
    assert img.get_data_dtype() == np.int16
    gen = np.asanyarray(nib.load(p.nsdgeneral).dataobj)
    assert set(np.unique(gen)) == {-1, 0, 1}
    with h5py.File(p.stimuli, "r") as f:
        d = f["imgBrick"]
        assert d.shape == (73000, 425, 425, 3) and d.dtype == np.uint8
        assert d.chunks == (1, 425, 425, 3)
    # unwritten images cost no disk: 6 images of 542 kB each, not 39.6 GB
    assert p.stimuli.stat().st_size < 10 * 425 * 425 * 3


def test_hdf5_betas_are_the_nifti_array_transposed(tmp_path):
    fx = _small_tree(tmp_path, betas_format="both", n_sessions=1)
    with h5py.File(fx.paths.betas_hdf5(1), "r") as f:
        stored = f["betas"][()]
    x, y, z = fx.volume_shape
    assert stored.shape == (TRIALS, z, y, x) and stored.dtype == np.int16
    assert np.array_equal(stored, fx.betas[1].transpose(3, 2, 1, 0))


# ------------------------------------------------------------------------------------------------ values
def test_load_matches_a_plain_loop_over_trials(nsd_tree, tmp_path):
    subject = load_subject(nsd_tree.root, nsd_tree.subject, cache_dir=tmp_path, progress=False)
    expected = expected_arrays(nsd_tree)
    _assert_matches(subject, expected)
    assert subject.sessions_used == (1, 2, 3)
    assert subject.train_fmri.dtype == np.float32 and subject.test_fmri.dtype == np.float32
    assert subject.train_image_ids.dtype == np.int64
    assert np.all(np.diff(subject.train_image_ids) > 0) and np.all(np.diff(subject.test_image_ids) > 0)
    # test ids are exactly the shared-1000 images shown
    assert set(subject.test_image_ids) <= set(nsd_tree.sharedix - 1)
    assert not set(subject.train_image_ids) & set(nsd_tree.sharedix - 1)
    # voxel order: C order of the volume, computed with a triple loop
    x, y, z = nsd_tree.volume_shape
    ijk = [(i, j, k) for i in range(x) for j in range(y) for k in range(z) if nsd_tree.nsdgeneral[i, j, k] > 0]
    assert np.array_equal(subject.voxel_ijk, np.array(ijk))
    assert subject.n_voxels == len(ijk) and subject.volume_shape == nsd_tree.volume_shape
    assert np.allclose(subject.affine, nsd_tree.affine)
    assert subject.mask_sha256 == mask_checksum(nsd_tree.volume_shape, np.array(ijk))
    # z-scoring with train stats: train columns have mean 0 and std 1 (ddof=1), test does not exactly
    assert np.allclose(subject.train_fmri.mean(0), 0, atol=1e-5)
    assert np.allclose(subject.train_fmri.std(0, ddof=1), 1, atol=1e-4)


def test_fixture_really_has_repeats_in_both_splits(nsd_tree):
    ids = nsd_tree.trial_image_ids()
    uniq, counts = np.unique(ids, return_counts=True)
    shared = set(nsd_tree.sharedix - 1)
    assert any(c > 1 and u in shared for u, c in zip(uniq, counts))
    assert any(c > 1 and u not in shared for u, c in zip(uniq, counts))


def test_mask_checksum_changes_with_voxels_and_shape():
    ijk = np.array([[0, 1, 2], [1, 1, 1]])
    a = mask_checksum((3, 3, 3), ijk)
    assert a == mask_checksum((3, 3, 3), ijk.copy())
    assert a != mask_checksum((3, 3, 4), ijk)
    assert a != mask_checksum((3, 3, 3), ijk[::-1])
    with pytest.raises(ValueError, match="voxel_ijk"):
        mask_checksum((3, 3, 3), np.zeros((2, 2)))


def test_hdf5_betas_give_the_same_subject_as_nifti(tmp_path):
    fx = _small_tree(tmp_path, betas_format="both")
    a = load_subject(fx.root, 1, cache_dir=tmp_path / "c1", progress=False, betas_format="nii.gz")
    b = load_subject(fx.root, 1, cache_dir=tmp_path / "c2", progress=False, betas_format="hdf5")
    c = load_subject(fx.root, 1, cache_dir=tmp_path / "c3", progress=False, betas_format="auto")
    for name in ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert np.array_equal(getattr(a, name), getattr(c, name)), name
    _assert_matches(a, expected_arrays(fx))


def test_sessions_subset_uses_only_those_trials(nsd_tree, tmp_path):
    sub = load_subject(nsd_tree.root, nsd_tree.subject, sessions=[2], cache_dir=tmp_path, progress=False)
    assert sub.sessions_used == (2,)
    _assert_matches(sub, expected_arrays(nsd_tree, sessions=[2]))
    shown = set(nsd_tree.subjectim[0, nsd_tree.masterordering[TRIALS : 2 * TRIALS] - 1] - 1)
    assert set(sub.train_image_ids) | set(sub.test_image_ids) == shown
    sub13 = load_subject(nsd_tree.root, nsd_tree.subject, sessions="1,3", cache_dir=tmp_path, progress=False)
    assert sub13.sessions_used == (1, 3)
    _assert_matches(sub13, expected_arrays(nsd_tree, sessions=[1, 3]))


def test_parse_sessions():
    assert parse_sessions("1-3,7") == [1, 2, 3, 7]
    assert parse_sessions("5") == [5]
    with pytest.raises(ValueError, match="'sessions'"):
        parse_sessions("a-b")
    with pytest.raises(ValueError, match="increasing"):
        parse_sessions("5-2")


# ------------------------------------------------------------------------------------------------ cache
def test_second_load_reads_the_cache(nsd_tree, tmp_path, monkeypatch):
    first = load_subject(nsd_tree.root, nsd_tree.subject, cache_dir=tmp_path, progress=False)
    assert not first.loaded_from_cache
    assert (first.cache_path / "meta.json").is_file()

    def boom(*a, **k):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(nsd_mod, "_prepare", boom)
    second = load_subject(nsd_tree.root, nsd_tree.subject, cache_dir=tmp_path, progress=False)
    assert second.loaded_from_cache and second.cache_path == first.cache_path
    for name in ARRAYS:
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert second.mask_sha256 == first.mask_sha256


def test_changed_betas_file_invalidates_the_cache(tmp_path):
    fx = _small_tree(tmp_path, n_sessions=1)
    first = load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    st = fx.paths.betas_nifti(1).stat()
    os.utime(fx.paths.betas_nifti(1), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    assert not second.loaded_from_cache and second.cache_path != first.cache_path


def test_default_cache_dir_is_under_the_cache_root(tmp_path, monkeypatch):
    fx = _small_tree(tmp_path, n_sessions=1)
    monkeypatch.setenv("BRAIN_DIFFUSER_CACHE", str(tmp_path / "root"))
    sub = load_subject(fx.root, 1, progress=False)
    assert sub.cache_path.parent == tmp_path / "root" / "nsd"


# ------------------------------------------------------------------------------------------------ bad input
def _no_cache_left(cache):
    assert not cache.exists() or list(cache.iterdir()) == []


def test_missing_expdesign(tmp_path):
    fx = _small_tree(tmp_path)
    fx.paths.expdesign.unlink()
    with pytest.raises(FileNotFoundError, match="nsd_expdesign.mat"):
        load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    _no_cache_left(tmp_path / "c")


def test_missing_nsd_root_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="NSD root folder not found"):
        load_subject(tmp_path / "nope", 1, progress=False)
    fx = _small_tree(tmp_path, n_sessions=1)
    with pytest.raises(ValueError, match=r"'subject' must be one of 1..8 .*; 9 was provided"):
        load_subject(fx.root, 9, progress=False)
    with pytest.raises(ValueError, match="'betas_format' must be one of"):
        load_subject(fx.root, 1, progress=False, betas_format="mat")


def test_subject_without_sessions(tmp_path):
    fx = _small_tree(tmp_path, subject=2)
    for s in fx.sessions:
        fx.paths.betas_nifti(s).unlink()
    with pytest.raises(FileNotFoundError, match=r"subject 2 has no betas sessions.*betas_fithrf_GLMdenoise_RR"):
        load_subject(fx.root, 2, cache_dir=tmp_path / "c", progress=False)
    _no_cache_left(tmp_path / "c")


def test_requested_session_missing(tmp_path):
    fx = _small_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"session 5 not found.*betas_session05"):
        load_subject(fx.root, 1, sessions=[1, 5], cache_dir=tmp_path / "c", progress=False)
    _no_cache_left(tmp_path / "c")


def test_betas_of_the_wrong_shape(tmp_path):
    fx = _small_tree(tmp_path)
    wrong = fx.betas[2][..., :700].copy()
    write_betas_nifti(fx.paths.betas_nifti(2), wrong, fx.affine)
    with pytest.raises(NSDFormatError, match=r"betas_session02.nii.gz: betas must have shape \(6, 7, 5, 750\).*found \(6, 7, 5, 700\)"):
        load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    _no_cache_left(tmp_path / "c")


def test_mask_that_does_not_match_the_betas_volume(tmp_path):
    fx = _small_tree(tmp_path)
    write_label_volume(fx.paths.nsdgeneral, fx.nsdgeneral[:, :, :4], fx.affine)
    with pytest.raises(NSDFormatError, match="betas_session01.nii.gz.*nsdgeneral's volume"):
        load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    _no_cache_left(tmp_path / "c")


def test_nan_betas(tmp_path):
    fx = _small_tree(tmp_path)
    betas = fx.betas[2].astype(np.float32)
    i, j, k = np.argwhere(fx.nsdgeneral > 0)[0]
    betas[i, j, k, 123] = np.nan
    nib.save(nib.Nifti1Image(betas, fx.affine), str(fx.paths.betas_nifti(2)))
    with pytest.raises(NSDFormatError, match=r"betas_session02.nii.gz: NaN.*trial 123"):
        load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    _no_cache_left(tmp_path / "c")


def test_float_betas_without_nan_are_accepted(tmp_path):
    fx = _small_tree(tmp_path, n_sessions=1)
    nib.save(nib.Nifti1Image(fx.betas[1].astype(np.float32), fx.affine), str(fx.paths.betas_nifti(1)))
    sub = load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    _assert_matches(sub, expected_arrays(fx))


def test_unreadable_hdf5(tmp_path):
    fx = _small_tree(tmp_path, betas_format="hdf5")
    fx.paths.betas_hdf5(2).write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(NSDFormatError, match="betas_session02.hdf5: not a readable HDF5 file"):
        load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    _no_cache_left(tmp_path / "c")


def test_hdf5_with_wrong_layout(tmp_path):
    fx = _small_tree(tmp_path, betas_format="hdf5", n_sessions=1)
    with h5py.File(fx.paths.betas_hdf5(1), "w") as f:
        f["betas"] = fx.betas[1]  # NIfTI order, not transposed
    with pytest.raises(NSDFormatError, match=r"dataset 'betas' must have shape \(750, 5, 7, 6\)"):
        load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)


# ------------------------------------------------------------------------------------------------ stimuli
def test_image_reads_one_image_without_loading_the_brick(nsd_tree, tmp_path):
    sub = load_subject(nsd_tree.root, nsd_tree.subject, cache_dir=tmp_path, progress=False)
    image_id, expected = next(iter(nsd_tree.images.items()))
    tracemalloc.start()
    got = sub.image(image_id)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert got.dtype == np.uint8 and got.shape == (425, 425, 3)
    assert np.array_equal(got, expected)
    assert peak < 4 * 425 * 425 * 3  # a few images' worth, never the 73000-image brick
    unwritten = next(i for i in range(73000) if i not in nsd_tree.images)
    assert not sub.image(unwritten).any()
    with pytest.raises(ValueError, match=r"'image_id' must be a 0-based 73k id in \[0, 73000\); 73000"):
        sub.image(73000)


def test_image_without_stimuli_file(tmp_path):
    fx = _small_tree(tmp_path, n_sessions=1)
    sub = load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError, match="nsd_stimuli.hdf5"):
        sub.image(0)


def test_captions_from_coco_json(nsd_tree, tmp_path):
    sub = load_subject(nsd_tree.root, nsd_tree.subject, cache_dir=tmp_path, progress=False)
    checked_empty = checked_many = False
    for image_id in sub.train_image_ids[:80]:
        expected = [c for c in nsd_tree.captions[int(image_id)] if c]
        assert sub.captions(int(image_id)) == expected
        checked_empty |= not expected
        checked_many |= len(expected) >= 2
    assert checked_empty and checked_many
    assert sub.captions(72999 if 72999 not in nsd_tree.captions else 0) == []


def test_captions_from_npy_and_missing(tmp_path):
    fx = _small_tree(tmp_path, n_sessions=1, captions_npy=True)
    sub = load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    arr = np.load(fx.paths.captions_npy_candidates[0], allow_pickle=False)
    assert arr.shape == (73000, 5)
    for image_id in list(fx.captions)[:30]:
        assert sub.captions(image_id) == [c for c in fx.captions[image_id] if c]
    fx.paths.captions_npy_candidates[0].unlink()
    with pytest.raises(FileNotFoundError, match=r"no captions found; looked for: .*COCO_73k_annots_curated.npy.*nsd_stim_info_merged.csv"):
        sub.captions(0)


# ------------------------------------------------------------------------------------------------ ROIs
def test_subject_roi_masks_come_from_prf_visualrois(nsd_tree, tmp_path):
    sub = load_subject(nsd_tree.root, nsd_tree.subject, cache_dir=tmp_path, progress=False)
    ijk = sub.voxel_ijk
    prf = nsd_tree.roi_volumes["prf-visualrois"][ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    faces = nsd_tree.roi_volumes["floc-faces"][ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    for name, labels in {"V1": (1, 2), "V2": (3, 4), "V3": (5, 6), "V4": (7,)}.items():
        mask = sub.roi_mask(name)
        assert mask.dtype == bool and mask.shape == (sub.n_voxels,)
        assert np.array_equal(mask, np.isin(prf, labels)), name
    assert not np.array_equal(sub.roi_mask("V1"), np.isin(faces, (1, 2)))
    assert np.array_equal(sub.roi_mask("faces"), faces > 0)
    assert np.array_equal(sub.roi_mask("FFA-1"), faces == 2)
    pattern = sub.synthetic_pattern({"V1": 1.0, "V1v": 0.5})
    expected = np.isin(prf, (1, 2)).astype(np.float32) + 0.5 * (prf == 1)
    assert pattern.dtype == np.float32 and np.array_equal(pattern, expected)
    assert len(sub.roi_names()) == 37


def test_missing_roi_file_is_reported(tmp_path):
    fx = _small_tree(tmp_path, n_sessions=1)
    fx.paths.roi_file("floc-words").unlink()
    sub = load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    assert "words" not in sub.roi_names() and "V1" in sub.roi_names()
    with pytest.raises(FileNotFoundError, match=r"floc-words.nii.gz does not exist; available ROIs.*'V1'"):
        sub.roi_mask("VWFA-1")
    with pytest.raises(KeyError, match="unknown ROI 'V7'"):
        sub.roi_mask("V7")


def test_uses_whatever_sessions_exist(tmp_path):
    fx = _small_tree(tmp_path, n_sessions=3)
    fx.paths.betas_nifti(2).unlink()
    sub = load_subject(fx.root, 1, cache_dir=tmp_path / "c", progress=False)
    assert sub.sessions_used == (1, 3)
    _assert_matches(sub, expected_arrays(fx, sessions=[1, 3]))


# ------------------------------------------------------------------------------------------------ writers
def test_writers_validate_their_inputs(tmp_path):
    from brain_diffuser_core.nsd_format import (
        write_captions_npy,
        write_expdesign,
        write_stimuli_hdf5,
    )

    ok_mo, ok_si, ok_sh = np.ones((1, 30000)), np.ones((8, 10000)), np.ones((1, 1000))
    with pytest.raises(ValueError, match=r"'masterordering' must have shape \(1, 30000\); \(30000,\)"):
        write_expdesign(tmp_path / "e.mat", np.ones(30000), ok_si, ok_sh)
    with pytest.raises(ValueError, match=r"'subjectim' must hold 1-based values in \[1, 73000\]; found range \[0, 1\]"):
        write_expdesign(tmp_path / "e.mat", ok_mo, np.concatenate([ok_si[:, :-1], np.zeros((8, 1))], 1), ok_sh)
    with pytest.raises(ValueError, match="int16"):
        write_betas_nifti(tmp_path / "b.nii.gz", np.zeros((2, 2, 2, 750), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"must be uint8 \(425, 425, 3\)"):
        write_stimuli_hdf5(tmp_path / "s.hdf5", {3: np.zeros((64, 64, 3), np.uint8)})
    with pytest.raises(ValueError, match="at most 5"):
        write_captions_npy(tmp_path / "c.npy", {1: ["a"] * 6}, n_stimuli=10)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_nifti_writer_is_deterministic_and_readable(tmp_path, rng):
    betas = rng.integers(-5, 5, (3, 4, 2, 750)).astype(np.int16)
    a = write_betas_nifti(tmp_path / "a.nii.gz", betas, np.eye(4))
    b = write_betas_nifti(tmp_path / "b.nii.gz", betas, np.eye(4))
    assert a.read_bytes() == b.read_bytes()
    img = nib.load(a)
    assert np.array_equal(np.asanyarray(img.dataobj), betas) and img.get_data_dtype() == np.int16
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
