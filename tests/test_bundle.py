import json

import numpy as np
import pytest

from brain_diffuser_core.bundle import BundleError, SubjectDecoders, load_bundle, save_bundle
from brain_diffuser_core.ridge import fit_ridge

SHAPES = {"vdvae": (6,), "clip_text": (2, 3)}


def _subject(rng, n_vox, mask="m", rank=None):
    X = rng.standard_normal((20, n_vox)).astype(np.float32)
    decs = {name: fit_ridge(X, rng.standard_normal((20, int(np.prod(s)))), 3.0, backend="torch", rank=rank)
            for name, s in SHAPES.items()}
    return X, SubjectDecoders(n_voxels=n_vox, mask_sha256=mask, decoders=decs,
                              train_feature_norm={"vdvae": 2.5, "clip_text": 1.5})


def test_round_trip_manifest_and_lazy_decoders(rng, tmp_path):
    X1, s1 = _subject(rng, 12, "mask1")
    X2, s2 = _subject(rng, 9, "mask2", rank=2)
    (tmp_path / "w.bin").write_bytes(b"tiny weights")
    models = {"vdvae": {"path": "models/w.bin", "sha256": "abc"}, "clip": {"hf_id": "openai/clip-vit-large-patch14"}}
    out = save_bundle(tmp_path / "b", {1: s1, 2: s2}, feature_shapes=SHAPES, models=models,
                      extra_files={"models/w.bin": tmp_path / "w.bin"})
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "models", "subj01_clip_text.safetensors", "subj01_vdvae.safetensors",
        "subj02_clip_text.safetensors", "subj02_vdvae.safetensors"]
    b = load_bundle(out)
    assert b.subjects == [1, 2] and b.features == ["vdvae", "clip_text"]
    assert b.feature_shape("clip_text") == (2, 3)
    assert b.subject_info(2)["n_voxels"] == 9 and b.subject_info(2)["n_train"] == 20
    assert b.train_feature_norm(1, "vdvae") == 2.5
    m = b.manifest
    assert m["format_version"] == 3 and "torch" in m["packages"] and m["subjects"]["1"]["decoders"]["vdvae"]["alpha"] == 3.0
    assert set(m["files"]) == {"models/w.bin", "subj01_vdvae.safetensors", "subj01_clip_text.safetensors",
                               "subj02_vdvae.safetensors", "subj02_clip_text.safetensors"}
    assert b.models["vdvae"]["path"] == str((out / "models/w.bin").resolve())
    assert b.models["clip"] == {"hf_id": "openai/clip-vit-large-patch14"}
    assert b._decoders == {}  # nothing read yet
    dec = b.decoder(2, "clip_text")
    assert dec.rank == 2
    np.testing.assert_array_equal(dec.predict(X2[:3]), s2.decoders["clip_text"].predict(X2[:3]))
    assert b.decoder(2, "clip_text") is dec
    b.check_subject(1, 12, "mask1")
    with pytest.raises(BundleError, match="decoders take 12 voxels; the data has 11"):
        b.check_subject(1, 11, "mask1")
    with pytest.raises(BundleError, match="mask checksum differs"):
        b.check_subject(1, 12, "other")
    with pytest.raises(BundleError, match=r"'subject' must be one of \[1, 2\]"):
        b.decoder(5, "vdvae")
    with pytest.raises(BundleError, match="no decoder for 'clip_vision'"):
        b.decoder(1, "clip_vision")


def test_update_keeps_other_subjects_and_is_atomic(rng, tmp_path):
    X1, s1 = _subject(rng, 12)
    _, s2 = _subject(rng, 9)
    save_bundle(tmp_path / "b", {1: s1}, feature_shapes=SHAPES, models={"clip": {"hf_id": "x"}})
    before = load_bundle(tmp_path / "b").manifest["files"]["subj01_vdvae.safetensors"]
    save_bundle(tmp_path / "b", {2: s2}, feature_shapes=SHAPES, update=True)
    b = load_bundle(tmp_path / "b", verify="eager")
    assert b.subjects == [1, 2] and b.models == {"clip": {"hf_id": "x"}}
    assert b.manifest["files"]["subj01_vdvae.safetensors"] == before
    np.testing.assert_array_equal(b.decoder(1, "vdvae").predict(X1[:2]), s1.decoders["vdvae"].predict(X1[:2]))
    # without update the folder is replaced
    save_bundle(tmp_path / "b", {2: s2}, feature_shapes=SHAPES)
    assert load_bundle(tmp_path / "b").subjects == [2]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp folders left
    with pytest.raises(BundleError, match=r"'vdvae' has shape \(6,\) in the existing bundle"):
        save_bundle(tmp_path / "b", {1: s1}, feature_shapes={"vdvae": (7,)}, update=True)


def test_validation_errors(rng, tmp_path):
    _, s1 = _subject(rng, 12)
    with pytest.raises(BundleError, match="takes 12 voxels; subject 1 has 13"):
        save_bundle(tmp_path / "b", {1: SubjectDecoders(13, "m", s1.decoders)}, feature_shapes=SHAPES)
    with pytest.raises(BundleError, match=r"predicts 6 values; feature shape \(2, 4\) needs 8"):
        save_bundle(tmp_path / "b", {1: s1}, feature_shapes={"vdvae": (2, 4), "clip_text": (2, 3)})
    with pytest.raises(BundleError, match="'path' or 'hf_id'"):
        save_bundle(tmp_path / "b", {1: s1}, feature_shapes=SHAPES, models={"vd": {"sha256": "x"}})
    assert not (tmp_path / "b").exists()

    save_bundle(tmp_path / "b", {1: s1}, feature_shapes=SHAPES)
    f = tmp_path / "b" / "subj01_vdvae.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    b = load_bundle(tmp_path / "b")  # lazy: the corruption shows when the decoder is read
    with pytest.raises(BundleError, match="subj01_vdvae.safetensors is corrupt"):
        b.decoder(1, "vdvae")
    b.decoder(1, "clip_text")  # the other file is fine
    with pytest.raises(BundleError, match="is corrupt"):
        load_bundle(tmp_path / "b", verify="eager")
    f.unlink()
    with pytest.raises(BundleError, match=r"missing files: \['subj01_vdvae.safetensors'\]"):
        load_bundle(tmp_path / "b")
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(tmp_path)


def test_mismatched_decoder_file_is_reported(rng, tmp_path):
    _, s1 = _subject(rng, 12)
    save_bundle(tmp_path / "b", {1: s1}, feature_shapes=SHAPES)
    mpath = tmp_path / "b" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["subjects"]["1"]["n_voxels"] = 10
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="maps 12 voxels to 6 values; the manifest says 10 voxels"):
        load_bundle(tmp_path / "b").decoder(1, "vdvae")


def test_update_of_one_feature_keeps_the_subjects_other_decoders(rng, tmp_path):
    _, s1 = _subject(rng, 12, "mask1")
    only_vdvae = SubjectDecoders(12, "mask1", {"vdvae": s1.decoders["vdvae"]})
    save_bundle(tmp_path / "b", {1: only_vdvae}, feature_shapes=SHAPES)
    before = (tmp_path / "b" / "subj01_vdvae.safetensors").read_bytes()
    only_text = SubjectDecoders(12, "mask1", {"clip_text": s1.decoders["clip_text"]})
    save_bundle(tmp_path / "b", {1: only_text}, feature_shapes=SHAPES, update=True)
    b = load_bundle(tmp_path / "b", verify="eager")
    assert sorted(b.subject_info(1)["decoders"]) == ["clip_text", "vdvae"]
    assert (tmp_path / "b" / "subj01_vdvae.safetensors").read_bytes() == before
    # a different voxel mask invalidates the old decoders of that subject
    save_bundle(tmp_path / "b", {1: SubjectDecoders(12, "mask2", {"clip_text": s1.decoders["clip_text"]})},
                feature_shapes=SHAPES, update=True)
    b = load_bundle(tmp_path / "b", verify="eager")
    assert sorted(b.subject_info(1)["decoders"]) == ["clip_text"]
    assert not (tmp_path / "b" / "subj01_vdvae.safetensors").exists()


def test_a_bundle_replaced_under_a_reader_is_named_as_replaced_not_corrupt(rng, tmp_path):
    _, s1 = _subject(rng, 12)
    _, s1_again = _subject(rng, 12)  # other weights: a rebuild by another process
    save_bundle(tmp_path / "b", {1: s1}, feature_shapes=SHAPES, models={"clip": {"hf_id": "x"}})
    b = load_bundle(tmp_path / "b")
    save_bundle(tmp_path / "b", {1: s1_again}, feature_shapes=SHAPES, models={"clip": {"hf_id": "x"}})
    with pytest.raises(BundleError, match="was replaced after it was opened"):
        b.decoder(1, "vdvae")
    fresh = load_bundle(tmp_path / "b")
    np.testing.assert_array_equal(fresh.decoder(1, "vdvae").predict(np.ones((1, 12), np.float32)),
                                  s1_again.decoders["vdvae"].predict(np.ones((1, 12), np.float32)))


def test_clip_location_prefers_the_clip_reference_then_versatile_diffusion(rng, tmp_path):
    _, s1 = _subject(rng, 12)
    both = {"clip": {"hf_id": "openai/clip-vit-large-patch14"}, "versatile_diffusion": {"path": "/models/vd"}}
    assert load_bundle(save_bundle(tmp_path / "a", {1: s1}, feature_shapes=SHAPES, models=both)).clip_location() \
        == "openai/clip-vit-large-patch14"
    vd_only = {"versatile_diffusion": {"path": "/models/vd"}}
    assert load_bundle(save_bundle(tmp_path / "b", {1: s1}, feature_shapes=SHAPES, models=vd_only)).clip_location() \
        == "/models/vd"
    assert load_bundle(save_bundle(tmp_path / "c", {1: s1}, feature_shapes=SHAPES,
                                   models={"vdvae": {"path": "/models/v.th"}})).clip_location() is None


def test_dual_decoders_round_trip_and_format_1_bundles_still_read(rng, tmp_path):
    """Format 2 adds the dual form (recorded as 'form'); a format-1 bundle (primal weights) reads as before."""
    X = rng.standard_normal((20, 30)).astype(np.float32)
    Y = rng.standard_normal((20, 6)).astype(np.float32)
    decs = {"vdvae": fit_ridge(X, Y, 3.0, backend="torch"), "clip_text": fit_ridge(X, Y, 3.0, form="primal")}
    sub = SubjectDecoders(n_voxels=30, mask_sha256="m", decoders=decs)
    b = load_bundle(save_bundle(tmp_path / "b", {1: sub}, feature_shapes=SHAPES))
    info = b.manifest["subjects"]["1"]["decoders"]
    assert (info["vdvae"]["form"], info["clip_text"]["form"]) == ("dual", "primal")
    assert b.decoder(1, "vdvae").form == "dual"
    # (equal to float rounding: a tensor read back from the file may sit at another alignment, and BLAS kernels
    # choose their summation order by alignment)
    np.testing.assert_allclose(b.decoder(1, "vdvae").predict(X[:2]), decs["vdvae"].predict(X[:2]), rtol=1e-5)
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m["format_version"] = 1
    for d in m["subjects"]["1"]["decoders"].values():
        d.pop("form")
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    np.testing.assert_allclose(load_bundle(tmp_path / "b").decoder(1, "clip_text").predict(X[:2]),
                               decs["clip_text"].predict(X[:2]), rtol=1e-5)
