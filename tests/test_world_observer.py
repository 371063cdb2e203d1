import numpy as np
import pytest

from brain_diffuser_core.world.channels import CHANNELS, GRID, scene_features
from brain_diffuser_core.world.observer import ROI_FILES, ROI_TABLES, VOLUME_SHAPE, Observer
from brain_diffuser_core.world.scenes import CATEGORIES, category_labels, generate_scenes
from nsd_fixtures import NSD_LABELS


@pytest.fixture(scope="module")
def obs():
    return Observer(1)


@pytest.fixture(scope="module")
def world():
    scenes = generate_scenes(180, seed=11)
    return scenes, scene_features(scenes), category_labels(scenes)


def test_roi_tables_and_labels_match_nsd(obs):
    for f, names in NSD_LABELS.items():
        assert ROI_TABLES[f] == {i + 1: n for i, n in enumerate(names)}
    labels = obs.roi_labels()
    assert set(labels) == set(ROI_FILES) == set(NSD_LABELS) | {"nsdgeneral"}
    for f, lab in labels.items():
        assert lab.shape == (obs.n_voxels,) and np.issubdtype(lab.dtype, np.integer)
        assert set(np.unique(lab)) <= {0} | set(ROI_TABLES[f])
    assert (labels["nsdgeneral"] == 1).all()
    assert set(np.unique(labels["prf-visualrois"])) == set(range(8))
    assert set(np.unique(labels["prf-eccrois"])) == set(range(6))
    assert set(np.unique(labels["floc-faces"])) == {0, 1, 2, 3, 4}  # aTL-faces lies outside the patch
    assert set(np.unique(labels["floc-bodies"])) == set(range(5))
    assert set(np.unique(labels["floc-places"])) == set(range(4))
    assert set(np.unique(labels["floc-words"])) == set(range(6))
    # eccentricity bands exist exactly inside the visual ROIs; category areas are disjoint from them and each other
    assert ((labels["prf-eccrois"] > 0) == (labels["prf-visualrois"] > 0)).all()
    floc = np.stack([labels[f] > 0 for f in ROI_FILES if f.startswith("floc")])
    assert floc.sum(0).max() == 1
    assert not (floc.any(0) & (labels["prf-visualrois"] > 0)).any()


def test_geometry_vertex_ids_and_volume(obs):
    assert 2000 <= obs.n_voxels <= 4500
    assert len(obs.vertex_ids["left"]) + len(obs.vertex_ids["right"]) == obs.n_voxels
    assert (obs.hemisphere[: len(obs.vertex_ids["left"])] == "left").all()
    np.testing.assert_array_equal(obs.vertex_index[obs.hemisphere == "right"], obs.vertex_ids["right"])
    assert (obs.vertex_ids["left"] < 10242).all()
    ijk = obs.voxel_ijk
    assert ijk.shape == (obs.n_voxels, 3)
    assert len(np.unique(ijk, axis=0)) == obs.n_voxels
    assert (ijk >= 0).all() and (ijk < np.array(VOLUME_SHAPE)).all()
    mm = ijk @ obs.affine[:3, :3].T + obs.affine[:3, 3]
    assert np.median(np.linalg.norm(mm - obs.coords_mm, axis=1)) < 6.0
    # the left hemisphere has negative x, and the patch is posterior
    assert (obs.coords_mm[obs.hemisphere == "left", 0] < 5).all()
    assert (obs.coords_mm[:, 1] < -20).all()


def test_subjects_are_deterministic_and_differ(obs):
    again = Observer(1)
    for f in ROI_FILES:
        np.testing.assert_array_equal(again.roi_labels()[f], obs.roi_labels()[f])
    np.testing.assert_array_equal(again.tuning.weights, obs.tuning.weights)
    np.testing.assert_array_equal(again.voxel_ijk, obs.voxel_ijk)
    other = Observer(2)
    assert other.n_voxels != obs.n_voxels or not np.array_equal(other.vertex_index, obs.vertex_index)
    reseeded = Observer(1, seed=1)
    assert not np.array_equal(reseeded.tuning.gain[:100], obs.tuning.gain[:100])


def test_category_areas_prefer_their_category(obs, world):
    _, feats, labels = world
    y = obs.responses(feats, noise=False)
    assert y.dtype == np.float32 and y.shape == (len(labels), obs.n_voxels)
    rois = obs.roi_labels()
    for f, cat in [("floc-faces", "face"), ("floc-bodies", "body"), ("floc-places", "place"),
                   ("floc-words", "word")]:
        vox = rois[f] > 0
        per_cat = np.array([y[labels == c][:, vox].mean() for c in range(len(CATEGORIES))])
        best = CATEGORIES.index(cat)
        assert per_cat.argmax() == best, (f, per_cat)
        assert per_cat[best] > np.delete(per_cat, best).max() + 0.5
    ffa = rois["floc-faces"] == 2  # FFA-1 alone, voxel by voxel
    face_mean = y[labels == 0][:, ffa].mean(0)
    other_mean = y[labels != 0][:, ffa].mean(0)
    assert (face_mean > other_mean).mean() > 0.9


def test_v1_prefers_texture_over_objects_more_than_hv4(obs, world):
    _, feats, labels = world
    y = obs.responses(feats, noise=False)
    vis = obs.roi_labels()["prf-visualrois"]

    def contrast(mask):
        tex = y[labels == CATEGORIES.index("texture")][:, mask].mean()
        objects = y[labels == CATEGORIES.index("object")][:, mask].mean()
        return tex - objects

    v1, hv4 = np.isin(vis, [1, 2]), vis == 7
    assert contrast(v1) > 0 > contrast(hv4)


def test_retinotopy_is_contralateral_and_upper_field_ventral(obs):
    vis = obs.roi_labels()["prf-visualrois"]
    stim = np.zeros((4, len(CHANNELS), GRID, GRID), np.float32)
    fine = CHANNELS.index("contrast_fine")
    h = GRID // 2
    stim[0, fine, :, :h] = 1.0  # left half of the image
    stim[1, fine, :, h:] = 1.0  # right half
    stim[2, fine, :h, :] = 1.0  # top half (upper visual field)
    stim[3, fine, h:, :] = 1.0  # bottom half
    y = obs.responses(stim, noise=False)
    v1 = np.isin(vis, [1, 2])
    right_hemi, left_hemi = v1 & (obs.hemisphere == "right"), v1 & (obs.hemisphere == "left")
    assert y[0, right_hemi].mean() > y[0, left_hemi].mean()
    assert y[1, left_hemi].mean() > y[1, right_hemi].mean()
    v1v, v1d = vis == 1, vis == 2  # ventral V1 = upper field
    assert y[2, v1v].mean() - y[3, v1v].mean() > 0 > y[2, v1d].mean() - y[3, v1d].mean()


def test_opponent_channels_carry_hue_and_luminance_and_early_voxels_are_hue_tuned(obs):
    from brain_diffuser_core.world.scenes import Scene

    def flat(rgb):
        img = np.zeros((64, 64, 3), np.uint8)
        img[:] = rgb
        return Scene(image=img, objects=[], category="texture", captions=[""] * 5, seed=0)

    colours = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220), "yellow": (220, 220, 40),
               "white": (250, 250, 250), "black": (10, 10, 10)}
    feats = scene_features([flat(c) for c in colours.values()])
    mean = {name: feats[i].mean(axis=(1, 2)) for i, name in enumerate(colours)}
    lum, rg, by = (CHANNELS.index(c) for c in ("luminance", "red_green", "blue_yellow"))
    assert mean["red"][rg] > 0.5 > -0.5 > mean["green"][rg]
    assert mean["blue"][by] > 0.5 > -0.5 > mean["yellow"][by]
    assert mean["white"][lum] > 0.4 > -0.4 > mean["black"][lum]
    assert abs(mean["white"][rg]) < 1e-6 and abs(mean["black"][by]) < 1e-6  # greys carry no hue
    # a flat field has no contrast and covers no category: only the opponent channels (and saturation) differ
    y = obs.responses(feats, noise=False)
    red_minus_green = y[0] - y[1]
    vis = obs.roi_labels()["prf-visualrois"]
    for labels, strong in (([1, 2], 0.2), ([7], 0.5)):  # V1, hV4 (hV4's hue weight is the largest)
        m = np.isin(vis, labels) & (obs.tuning.visibility > 0.5)
        per_voxel = np.abs(red_minus_green[m])
        assert np.median(per_voxel) > strong, (labels, np.median(per_voxel))
        # each voxel has its own preferred hue: the ROI's mean response hardly tells red from green
        assert abs(red_minus_green[m].mean()) < 0.25 * per_voxel.mean()
    # category areas are not colour tuned
    faces = obs.roi_labels()["floc-faces"] > 0
    np.testing.assert_allclose(y[0, faces], y[1, faces], atol=1e-5)


def test_eccentricity_bands_are_ordered_outward(obs):
    ecc_lab = obs.roi_labels()["prf-eccrois"]
    ecc = obs.tuning.eccentricity
    edges = [0, 0.5, 1, 2, 4, np.inf]
    for band in range(1, 6):
        e = ecc[ecc_lab == band]
        assert ((e >= edges[band - 1]) & (e < edges[band])).all()
    # on the cortex: bands move away from the occipital pole (most posterior vertex of each hemisphere)
    dist = np.empty(obs.n_voxels)
    for h in ("left", "right"):
        m = obs.hemisphere == h
        pole = obs.coords_mm[m][np.argmin(obs.coords_mm[m, 1])]
        dist[m] = np.linalg.norm(obs.coords_mm[m] - pole, axis=1)
    med = [np.median(dist[ecc_lab == b]) for b in range(1, 6)]
    assert all(a < b for a, b in zip(med, med[1:])), med
    # pRFs grow with eccentricity and from V1 to hV4
    t = obs.tuning
    vis = obs.roi_labels()["prf-visualrois"]
    v1 = np.isin(vis, [1, 2])
    assert np.corrcoef(t.eccentricity[v1], t.prf_size[v1])[0, 1] > 0.8
    ratio = [np.median(t.prf_size[m] / (t.eccentricity[m] + 1)) for m in (v1, vis == 7)]
    assert ratio[1] > 1.5 * ratio[0]


def test_noise_repeats_differ_but_correlate(obs, world):
    _, feats, labels = world
    n = len(labels)
    a = obs.responses(feats, seeds=range(n))
    b = obs.responses(feats, seeds=range(1000, 1000 + n))
    clean = obs.responses(feats, noise=False)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, obs.responses(feats, seeds=range(n)))
    # per-item noise: a row does not depend on the batch (up to float32 rounding of the matrix product)
    np.testing.assert_allclose(a[5:9], obs.responses(feats[5:9], seeds=range(5, 9)), atol=1e-4, rtol=0)
    sel = obs.tuning.visibility > 0.8
    r = [np.corrcoef(a[:, v], b[:, v])[0, 1] for v in np.flatnonzero(sel)[:300]]
    assert 0.05 < np.median(r) < 0.8
    resid = (a - clean)[:, sel]
    assert resid.std() == pytest.approx(obs.noise_sd, rel=0.1)
    rng_draw = obs.responses(feats, rng=np.random.default_rng(0))
    assert rng_draw.shape == a.shape and not np.allclose(rng_draw, a)


def test_ncsnr_matches_nsd_estimator_on_simulated_repeats_and_the_default_is_nsd_like(obs, world):
    _, feats, labels = world
    n, reps = len(labels), 3
    ncsnr = obs.ncsnr(feats)
    assert ncsnr.shape == (obs.n_voxels,) and ncsnr.dtype == np.float32 and (ncsnr >= 0).all()
    # NSD's estimator from the trials themselves (Allen et al. 2022): noise variance = mean over images of the
    # variance across repeats; signal variance = variance of the trial betas minus the noise variance
    trials = np.stack([obs.responses(feats, seeds=range(r * n, (r + 1) * n)) for r in range(reps)]).astype(np.float64)
    noise_var = trials.var(axis=0, ddof=1).mean(axis=0)
    signal_var = np.clip(trials.reshape(-1, obs.n_voxels).var(axis=0, ddof=1) - noise_var, 0, None)
    empirical = np.sqrt(signal_var / noise_var)
    assert np.median(empirical) == pytest.approx(float(np.median(ncsnr)), rel=0.05)
    # the default noise gives NSD's noise ceiling for 3-trial means (24.2% reported for nsdgeneral voxels)
    nc3 = 100 * ncsnr ** 2 / (ncsnr ** 2 + 1 / 3)
    assert 20.0 < float(np.median(nc3)) < 30.0
    # and it scales as 1 / noise_sd
    np.testing.assert_allclose(Observer(1, noise_sd=2 * obs.noise_sd).ncsnr(feats), ncsnr / 2, rtol=1e-5)
    # without noise the ceiling is perfect wherever there is signal, not zero
    noiseless = Observer(1, noise_sd=0.0).ncsnr(feats)
    assert np.isinf(noiseless[ncsnr > 0]).all()


def test_bad_arguments_are_named(obs, world):
    with pytest.raises(ValueError, match=r"'subject' must be one of \[1, 2, 5, 7\]; 3 was provided"):
        Observer(3)
    _, feats, _ = world
    with pytest.raises(ValueError, match="exactly one of 'rng' or 'seeds'"):
        obs.responses(feats[:2])
    with pytest.raises(ValueError, match="one seed per scene"):
        obs.responses(feats[:2], seeds=[1])
    with pytest.raises(ValueError, match="features must have shape"):
        obs.responses(np.zeros((2, 3, 4, 4), np.float32), noise=False)


@pytest.mark.parametrize("subject", [2, 5, 7])
def test_every_subject_has_every_roi_but_atl_faces(subject):
    labels = Observer(subject).roi_labels()
    for f, table in ROI_TABLES.items():
        for value, name in table.items():
            count = int((labels[f] == value).sum())
            if name == "aTL-faces":
                assert count == 0
            else:
                assert count >= 5, (subject, f, name, count)
