from types import SimpleNamespace

import numpy as np
import pytest
import torch

from brain_diffuser_core.__main__ import main
from brain_diffuser_core.bundle import load_bundle
from brain_diffuser_core.cli.fit import fit_decoders, fit_subject_bundle, parse_feature_list
from brain_diffuser_core.features.store import FeatureStore, FeatureWriter, write_features
from brain_diffuser_core.ridge import factorise, fit_ridge

SHAPES = {"vdvae": (10,), "clip_text": (3, 4), "clip_vision": (5, 4)}


def _write_store(folder, ids, fmri, rng):
    """Features that are a linear map of the fMRI (+ noise), one layout per feature."""
    truth = {}
    for k, (name, shape) in enumerate(SHAPES.items()):
        W = rng.standard_normal((fmri.shape[1], int(np.prod(shape))))
        feats = (fmri @ W + 0.1 * rng.standard_normal((len(ids), W.shape[1]))).reshape(len(ids), *shape)
        if k == 2:
            w = FeatureWriter(folder, name, shape, dtype="float32")
            half = len(ids) // 2
            w.append(ids[:half], feats[:half])
            w.append(ids[half:], feats[half:])
        else:
            write_features(folder, name, ids, feats, dtype="float32", layout="npy" if k else "safetensors")
        truth[name] = W
    return truth


@pytest.fixture(scope="module")
def subject(nsd_tree, tmp_path_factory):
    from brain_diffuser_core.nsd import load_subject

    cache = tmp_path_factory.mktemp("cache")
    return load_subject(nsd_tree.root, nsd_tree.subject, cache_dir=cache, progress=False), cache


def test_cli_end_to_end_and_partial_refit(subject, nsd_tree, tmp_path, rng):
    subj, cache = subject
    ids = np.concatenate([subj.train_image_ids, subj.test_image_ids])
    fmri = np.concatenate([subj.train_fmri, subj.test_fmri])
    _write_store(tmp_path / "feats", ids, fmri, rng)
    (tmp_path / "models.json").write_text('{"clip": {"hf_id": "openai/clip-vit-large-patch14"}}')
    argv = ["fit", "--nsd-root", str(nsd_tree.root), "--subject", str(nsd_tree.subject), "--features",
            str(tmp_path / "feats"), "--out", str(tmp_path / "bundle"), "--cache-dir", str(cache),
            "--alpha-vdvae", "1", "--alpha-clip-text", "1", "--alpha-clip-vision", "1", "--backend", "torch",
            "--models-json", str(tmp_path / "models.json")]
    assert main(argv) == 0
    b = load_bundle(tmp_path / "bundle", verify="eager")
    assert b.subjects == [nsd_tree.subject] and b.features == list(SHAPES)
    assert b.feature_shape("clip_vision") == (5, 4) and b.models == {"clip": {"hf_id": "openai/clip-vit-large-patch14"}}
    b.check_subject(nsd_tree.subject, subj.n_voxels, subj.mask_sha256)
    info = b.subject_info(nsd_tree.subject)
    assert info["n_train"] == len(subj.train_image_ids) and info["decoders"]["vdvae"]["alpha"] == 1.0
    store = FeatureStore(tmp_path / "feats")
    for name in SHAPES:
        pred = b.decoder(nsd_tree.subject, name).predict(subj.test_fmri, rescale="none")
        true = store.get(name, subj.test_image_ids).reshape(len(subj.test_image_ids), -1)
        assert np.corrcoef(pred.ravel(), true.ravel())[0, 1] > 0.95
        train = store.get(name, subj.train_image_ids).reshape(len(subj.train_image_ids), -1)
        assert info["decoders"][name]["train_feature_norm"] == pytest.approx(np.linalg.norm(train, axis=1).mean(), rel=1e-4)
    old_text = b.manifest["files"][f"subj{nsd_tree.subject:02d}_clip_text.safetensors"]

    # refit only VDVAE with the paper's alpha and low rank: the other decoders stay untouched
    assert main(argv[:11] + ["--features-to", "vdvae", "--rank", "3"]) == 0
    b2 = load_bundle(tmp_path / "bundle", verify="eager")
    d2 = b2.subject_info(nsd_tree.subject)["decoders"]
    assert d2["vdvae"]["alpha"] == 50_000.0 and d2["vdvae"]["rank"] == 3 and d2["clip_text"]["alpha"] == 1.0
    assert b2.manifest["files"][f"subj{nsd_tree.subject:02d}_clip_text.safetensors"] == old_text
    assert b2.models == b.models


def test_cli_reports_missing_features(subject, nsd_tree, tmp_path, rng, capsys):
    subj, cache = subject
    ids = subj.train_image_ids[1:]  # one train image lacks features
    write_features(tmp_path / "feats", "vdvae", ids, rng.standard_normal((len(ids), 4)))
    code = main(["fit", "--nsd-root", str(nsd_tree.root), "--subject", str(nsd_tree.subject), "--features",
                 str(tmp_path / "feats"), "--out", str(tmp_path / "b"), "--cache-dir", str(cache),
                 "--features-to", "vdvae"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"lacks 1 of the subject's {len(subj.train_image_ids)} train images" in err
    assert str(int(subj.train_image_ids[0])) in err
    assert not (tmp_path / "b").exists()
    assert main(["fit", "--nsd-root", str(nsd_tree.root), "--subject", str(nsd_tree.subject), "--features",
                 str(tmp_path / "feats"), "--out", str(tmp_path / "b"), "--cache-dir", str(cache),
                 "--features-to", "clip_text"]) == 2
    assert "'clip_text' is not in the feature store" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'--features-to' must be a comma list"):
        parse_feature_list("vdvae,clip")


def test_fit_decoders_with_arrays_matches_fit_ridge(rng):
    X = rng.standard_normal((30, 50)).astype(np.float32)
    feats = {"vdvae": rng.standard_normal((30, 6)), "clip_text": rng.standard_normal((30, 2, 3))}
    decs, norms, shapes = fit_decoders(X, feats, alphas={"vdvae": 2.0}, backend="torch", n_targets_batch=4)
    assert shapes == {"vdvae": (6,), "clip_text": (2, 3)}
    assert decs["clip_text"].alpha == 100_000.0  # the paper's default
    # the same factorisation: fixed alphas go the kernel (Cholesky) way (float16 storage would round an
    # eigendecomposition's weights differently)
    ref = fit_ridge(factorise(X, backend="torch", method="kernel"), feats["vdvae"], 2.0, backend="torch")
    np.testing.assert_allclose(decs["vdvae"].predict(X[:5]), ref.predict(X[:5]), rtol=1e-5, atol=1e-5)
    assert norms["clip_text"] == pytest.approx(np.linalg.norm(feats["clip_text"].reshape(30, -1), axis=1).mean(), rel=1e-5)


def test_adding_a_subject_keeps_the_others(rng, tmp_path):
    write_features(tmp_path / "feats", "vdvae", np.arange(300), rng.standard_normal((300, 4)))
    store = FeatureStore(tmp_path / "feats")
    for s, nvox in ((1, 12), (2, 9)):
        ids = np.arange(25) + 100 * s
        fmri = rng.standard_normal((25, nvox)).astype(np.float32)
        fake = SimpleNamespace(subject=s, train_fmri=fmri, train_image_ids=ids, n_voxels=nvox, mask_sha256=f"m{s}")
        fit_subject_bundle(fake, store, tmp_path / "b", feature_names=["vdvae"], backend="torch")
    b = load_bundle(tmp_path / "b", verify="eager")
    assert b.subjects == [1, 2] and b.feature_shape("vdvae") == (4,)
    assert b.decoder(1, "vdvae").n_features == 12 and b.decoder(2, "vdvae").n_features == 9
    assert b.subject_info(1)["mask_sha256"] == "m1" and b.subject_info(2)["n_train"] == 25


@pytest.mark.parametrize("form", ["dual", "primal"])
def test_shared_alpha_and_a_given_factorisation_give_the_same_decoders(rng, monkeypatch, form):
    """fit_decoders builds an alpha's operators once for the features sharing it, and reuses a factorisation it
    is given: the decoders' tensors must be bit-for-bit those of separate fit_ridge calls on a fresh one."""
    from brain_diffuser_core.ridge import RidgeFactorisation

    X = rng.standard_normal((40, 70)).astype(np.float32)
    feats = {"vdvae": rng.standard_normal((40, 9)), "clip_text": rng.standard_normal((40, 2, 5)),
             "clip_vision": rng.standard_normal((40, 3, 2))}
    alphas = {"vdvae": 30.0, "clip_text": 30.0, "clip_vision": 5.0}
    built = []
    name_of = "_dual_operators" if form == "dual" else "_alpha_operators"
    real = getattr(RidgeFactorisation, name_of)
    monkeypatch.setattr(RidgeFactorisation, name_of, lambda self, a, *rest: built.append(a) or real(self, a, *rest))
    fact = factorise(X, backend="torch")
    decs, _, _ = fit_decoders(X, feats, alphas=alphas, backend="torch", loo_stats=12, n_targets_batch=4,
                              factorisation=fact, form=form)
    assert sorted(built) == [5.0, 30.0]  # one set of operators per distinct alpha
    assert fact._operators is None  # the cache is dropped afterwards
    for name, val in feats.items():
        ref = fit_ridge(factorise(X, backend="torch"), val.reshape(40, -1), alphas[name], backend="torch",
                        loo_stats=12, n_targets_batch=4, form=form)
        # fit_decoders adds the principal axes of the training targets (the ROI-optimal scale) to fit_ridge's
        axes = {"target_axes", "target_axes_var", "target_residual_var"}
        assert decs[name].form == form and set(decs[name].tensors) == set(ref.tensors) | axes
        for k, t in ref.tensors.items():
            assert torch.equal(decs[name].tensors[k], t), (name, k)
    with pytest.raises(ValueError, match="factorisation"):
        fit_decoders(X[:, :60], feats, alphas=alphas, backend="torch", factorisation=fact)
