"""brain_diffuser_core.patterns (top driving training images, NIfTI pattern upload) and the ROI designer page
showing them (AppTest on the small world and tiny bundle of tests/app_sources.py)."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brain_diffuser_core.patterns import pattern_from_nifti, top_driving_images

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.array([[-1.8, 0, 0, 72.0], [0, 1.8, 0, -90.0], [0, 0, 1.8, -54.0], [0, 0, 0, 1]])


# ------------------------------------------------------------------------------------------- top_driving_images
def _loop_ranking(fmri, ids, pattern, k):
    total = sum(abs(float(w)) for w in pattern)
    scored = []
    for r in range(fmri.shape[0]):
        s = 0.0
        for v in range(fmri.shape[1]):
            s += float(fmri[r, v]) * float(pattern[v])
        scored.append((-s / total, r))
    scored.sort()
    return [int(ids[r]) for _, r in scored[:k]], [-s for s, _ in scored[:k]]


def test_top_driving_images_matches_a_loop():
    rng = np.random.default_rng(3)
    fmri = rng.standard_normal((30, 17)).astype(np.float32)
    ids = rng.choice(73000, size=30, replace=False).astype(np.int64)
    pattern = np.where(rng.random(17) < 0.5, rng.uniform(-1, 2, 17), 0.0).astype(np.float32)
    got_ids, got_scores = top_driving_images(fmri, ids, pattern, k=5)
    want_ids, want_scores = _loop_ranking(fmri, ids, pattern, 5)
    assert got_ids.dtype == np.int64 and got_scores.dtype == np.float32
    assert got_ids.tolist() == want_ids
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(got_scores) <= 0)


def test_indicator_pattern_scores_are_the_mean_response_inside_the_roi():
    rng = np.random.default_rng(4)
    fmri = rng.standard_normal((12, 20)).astype(np.float32)
    roi = np.zeros(20, np.float32)
    roi[[2, 5, 11, 19]] = 1.5
    ids, scores = top_driving_images(fmri, np.arange(100, 112), roi, k=12)
    means = fmri[:, [2, 5, 11, 19]].mean(axis=1)
    np.testing.assert_allclose(scores, means[ids - 100], rtol=1e-5, atol=1e-6)
    assert sorted(ids.tolist()) == list(range(100, 112))
    # more images asked than there are: all of them
    assert top_driving_images(fmri, np.arange(12), roi, k=50)[0].shape == (12,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(pattern=np.zeros(6, np.float32)), "all 6 weights are 0"),
    (dict(pattern=np.ones(5, np.float32)), "shape (6,)"),
    (dict(pattern=np.array([1, np.nan, 0, 0, 0, 0], np.float32)), "1 NaN/inf"),
    (dict(train_image_ids=np.arange(3)), "shape (4,)"),
    (dict(train_fmri=np.ones(6, np.float32)), "(n_train, n_voxels)"),
    (dict(k=0), "'k' must be an integer >= 1"),
])
def test_top_driving_images_rejects_bad_inputs(kwargs, message):
    args = dict(train_fmri=np.ones((4, 6), np.float32), train_image_ids=np.arange(4),
                pattern=np.ones(6, np.float32), k=2)
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        top_driving_images(**args)
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------- pattern_from_nifti
def _volume_and_voxels(shape=(5, 6, 7), n=25, seed=0):
    rng = np.random.default_rng(seed)
    vol = rng.standard_normal(shape).astype(np.float32)
    flat = np.sort(rng.choice(int(np.prod(shape)), size=n, replace=False))
    ijk = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64)
    return vol, ijk


def _nii_bytes(vol, affine=AFFINE, gz=False, tmp_path=None) -> bytes:
    img = nib.Nifti1Image(vol, affine)
    if gz:  # written by nibabel itself as a .nii.gz file
        path = Path(tmp_path) / "p.nii.gz"
        nib.save(img, path)
        data = path.read_bytes()
        assert data[:2] == b"\x1f\x8b"
        return data
    return img.to_bytes()


@pytest.mark.parametrize("gz", [False, True])
def test_nifti_round_trip_samples_the_voxels(gz, tmp_path):
    vol, ijk = _volume_and_voxels()
    data = _nii_bytes(vol, gz=gz, tmp_path=tmp_path)
    got = pattern_from_nifti(data, ijk, vol.shape, AFFINE)
    want = [vol[i, j, k] for i, j, k in ijk.tolist()]
    assert got.dtype == np.float32 and got.shape == (len(ijk),)
    np.testing.assert_array_equal(got, np.array(want, np.float32))
    # without an affine to check, and gzip done by hand on the .nii bytes
    np.testing.assert_array_equal(pattern_from_nifti(gzip.compress(_nii_bytes(vol)), ijk, vol.shape, None), got)


def test_nifti_single_volume_4d_is_accepted_and_several_volumes_are_not():
    vol, ijk = _volume_and_voxels()
    got = pattern_from_nifti(_nii_bytes(vol[..., None]), ijk, vol.shape, AFFINE)
    np.testing.assert_array_equal(got, vol[ijk[:, 0], ijk[:, 1], ijk[:, 2]])
    with pytest.raises(ValueError, match=r"shape \(5, 6, 7\).*shape \(5, 6, 7, 2\) was provided"):
        pattern_from_nifti(_nii_bytes(np.stack([vol, vol], axis=-1)), ijk, vol.shape, AFFINE)


def test_nifti_errors_name_expected_and_found():
    vol, ijk = _volume_and_voxels()
    with pytest.raises(ValueError, match=r"func1pt8mm shape \(5, 6, 7\).*shape \(5, 6, 8\) was provided"):
        pattern_from_nifti(_nii_bytes(np.zeros((5, 6, 8), np.float32)), ijk, vol.shape, AFFINE)
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.8
    with pytest.raises(ValueError, match="affine must match.*expected.*72.0.*found.*73.8"):
        pattern_from_nifti(_nii_bytes(vol, affine=shifted), ijk, vol.shape, AFFINE)
    # NaN at one of the subject's voxels is refused; NaN elsewhere in the volume is ignored
    bad = vol.copy()
    i, j, k = ijk[3]
    bad[i, j, k] = np.nan
    with pytest.raises(ValueError, match=rf"1 of {len(ijk)} are NaN/inf \(first at voxel ijk \[{i}, {j}, {k}\]\)"):
        pattern_from_nifti(_nii_bytes(bad), ijk, vol.shape, AFFINE)
    outside = vol.copy()
    inside = np.zeros(vol.shape, bool)
    inside[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = True
    outside[~inside] = np.inf
    assert np.isfinite(pattern_from_nifti(_nii_bytes(outside), ijk, vol.shape, AFFINE)).all()
    with pytest.raises(ValueError, match="could not be read as one"):
        pattern_from_nifti(b"not a nifti file at all" * 20, ijk, vol.shape, AFFINE)
    with pytest.raises(ValueError, match="could not be decompressed"):
        pattern_from_nifti(b"\x1f\x8b" + b"garbage" * 10, ijk, vol.shape, AFFINE)
    with pytest.raises(ValueError, match="inside the volume"):
        pattern_from_nifti(_nii_bytes(vol), ijk + np.array([5, 0, 0]), vol.shape, AFFINE)
    with pytest.raises(ValueError, match="at most"):
        pattern_from_nifti(_nii_bytes(vol), ijk, vol.shape, AFFINE, max_bytes=1000)


# ------------------------------------------------------------------------------------------- the page
from app_sources import app_errors  # noqa: E402


def _errors(at) -> list[str]:
    return app_errors(at)


def test_page_generates_scenes_beside_the_top_driving_training_images(app, sources):
    from brain_diffuser_core.nsd import load_subject

    d = load_subject(sources[1], 1, cache_dir=sources[2], progress=False)
    app.run()
    assert not _errors(app), _errors(app)
    app.slider(key="roi_n_seeds").set_value(1).run()
    app.button(key="roi_generate").click().run()
    assert not _errors(app), _errors(app)
    captions = [c for img in app.get("image") for c in img.captions]
    assert [c for c in captions if c.startswith("seed ")], captions
    driving = [c for c in captions if c.startswith("73k ")]
    want_ids, want_scores = top_driving_images(d.train_fmri, d.train_image_ids, d.synthetic_pattern({"V1": 1.0}))
    assert [int(c.split()[1].rstrip(",")) for c in driving] == want_ids.tolist()
    assert [c.split("score ")[1] for c in driving] == [f"{s:.2f}" for s in want_scores]
    assert any("drive this pattern most" in m.value and "subject 1" in m.value for m in app.markdown)


def test_page_accepts_a_nifti_pattern_and_rejects_a_wrong_volume(app, sources, tmp_path):
    from brain_diffuser_core.nsd import load_subject

    d = load_subject(sources[1], 1, cache_dir=sources[2], progress=False)
    vol = np.zeros(d.volume_shape, np.float32)
    i, j, k = d.voxel_ijk[:40].T
    vol[i, j, k] = 1.0
    path = tmp_path / "mine.nii.gz"
    nib.save(nib.Nifti1Image(vol, d.affine), path)
    app.run()
    wrong = nib.Nifti1Image(np.zeros(tuple(s + 1 for s in d.volume_shape), np.float32), d.affine).to_bytes()
    app.file_uploader(key="roi_upload_npy").set_value(("bad.nii", wrong, "application/octet-stream")).run()
    assert any(f"func1pt8mm shape {d.volume_shape}" in e.value and "bad.nii" in e.value for e in app.error), \
        _errors(app)
    app.file_uploader(key="roi_upload_npy").set_value(("mine.nii.gz", path.read_bytes(),
                                                       "application/gzip")).run()
    assert not _errors(app), _errors(app)
    assert any("40 of" in m.value and "`mine`" in m.value for m in app.markdown), [m.value for m in app.markdown]


def test_page_average_ranks_the_first_subjects_training_images(app, sources):
    from brain_diffuser_core import surface
    from brain_diffuser_core.nsd import load_subject
    from pages import _state

    d = load_subject(sources[1], 1, cache_dir=sources[2], progress=False)
    app.run()
    app.sidebar.selectbox(key="subject").set_value("average").run()
    app.selectbox(key="roi_preset").set_value("V1-V4+faces").run()
    app.radio(key="roi_hemisphere").set_value("left").run()
    app.slider(key="roi_n_seeds").set_value(1).run()
    app.button(key="roi_generate").click().run()
    assert not _errors(app), _errors(app)
    from brain_diffuser_core.rois import PAPER_PRESETS

    weights = dict(PAPER_PRESETS["V1-V4+faces"])
    pattern = surface.restrict_to_hemisphere(d.synthetic_pattern(weights),
                                             _state.hemisphere_of_voxels(sources[1], 1), "left")
    want_ids, _ = top_driving_images(d.train_fmri, d.train_image_ids, pattern)
    driving = [c for img in app.get("image") for c in img.captions if c.startswith("73k ")]
    assert [int(c.split()[1].rstrip(",")) for c in driving] == want_ids.tolist()
    assert any("the first subject of the average" in m.value for m in app.markdown)
