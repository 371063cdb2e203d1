"""The MiniNSD demo bundle (world/demo.py), the demo-model trainers (world/train.py) and the shared
extraction loop (features/extract.py), on a small world built into tmp."""
from __future__ import annotations

import argparse
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from brain_diffuser_core.tiny_models import DEMO_IMAGE_SIZE
from brain_diffuser_core.world.build import build_world
from brain_diffuser_core.world import demo
from brain_diffuser_core.world.demo import (MANIFEST_FILE, NOT_TRAINED_MESSAGE, TRAINED_KEY, UNTRAINED_KEY,
                                            DemoDiskFullError, DemoModelsError, ensure_demo_bundle,
                                            ensure_untrained_models, model_files, models_digest, read_demo_stamp,
                                            verify_demo_models, write_models_manifest)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small world: 2 subjects, 48 train + 6 test images, one session."""
    root = tmp_path_factory.mktemp("world") / "mininsd"
    build_world(root, n_train=48, n_test=6, subjects=[1, 2])
    return root


@pytest.fixture(scope="module")
def untrained_bundle(world, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    logger = logging.getLogger("brain_diffuser_core.world.demo")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        path = ensure_demo_bundle(cache, models_dir=cache / "absent-models", world_root=world)
    finally:
        logger.removeHandler(handler)
    return cache, path, [r.getMessage() for r in records]


def _subject(world, cache, s):
    from brain_diffuser_core.nsd import load_subject

    return load_subject(world, s, cache_dir=cache / "nsd", progress=False)


# ------------------------------------------------------------------------------------------- demo bundle
def test_untrained_fallback_is_flagged_and_reconstructs(world, untrained_bundle):
    from brain_diffuser_core.bundle import load_bundle
    from brain_diffuser_core.pipeline import BrainDiffuser

    cache, path, messages = untrained_bundle
    assert NOT_TRAINED_MESSAGE in messages
    bundle = load_bundle(path, verify="eager")
    assert UNTRAINED_KEY in bundle.models and TRAINED_KEY not in bundle.models
    assert bundle.subjects == [1, 2]
    stamp = read_demo_stamp(path)
    assert stamp["models_trained"] is False and stamp["subjects"] == [1, 2]

    subj = _subject(world, cache, 2)
    assert bundle.subject_info(2)["n_voxels"] == subj.n_voxels
    assert bundle.subject_info(2)["n_train"] == 48
    bd = BrainDiffuser(bundle, device="cpu")
    rec = bd.reconstruct(subj.test_fmri[:1], 2, image_ids=subj.test_image_ids[:1], num_inference_steps=4)[0]
    assert rec.stage1.shape == (64, 64, 3) and rec.stage1.dtype == np.uint8
    assert rec.final.shape == (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE, 3) and rec.final.dtype == np.uint8
    assert rec.features["clip_vision"].shape == (257, 32)


def test_bundle_is_reused_then_rebuilt_when_model_checksums_change(world, untrained_bundle, tmp_path):
    from brain_diffuser_core.bundle import load_bundle
    from brain_diffuser_core.features.vdvae import VDVAE, VDVAEConfig, save_vdvae

    cache, path, _ = untrained_bundle
    created = json.loads((path / "manifest.json").read_text())["created"]
    again = ensure_demo_bundle(cache, models_dir=cache / "absent-models", world_root=world)
    assert again == path and json.loads((path / "manifest.json").read_text())["created"] == created

    # "trained" models: a copy of the fallback, then one file changed
    models = tmp_path / "models"
    shutil.copytree(cache / "demo-models-untrained", models)
    out = ensure_demo_bundle(tmp_path / "c", models_dir=models, world_root=world)
    first = read_demo_stamp(out)
    assert first["models_trained"] is True and TRAINED_KEY in load_bundle(out).models
    w_before = load_bundle(out).decoder(1, "vdvae").dense_weight().float().numpy()

    torch.manual_seed(123)
    save_vdvae(VDVAE(VDVAEConfig.tiny(64)).eval(), models / "vdvae.safetensors")
    out = ensure_demo_bundle(tmp_path / "c", models_dir=models, world_root=world)
    second = read_demo_stamp(out)
    assert second["models_sha256"] != first["models_sha256"]
    assert second["models_sha256"] == models_digest(models)
    w_after = load_bundle(out).decoder(1, "vdvae").dense_weight().float().numpy()
    assert not np.allclose(w_before, w_after)  # refitted on the new model's features


def test_extracted_features_match_direct_encoding(world, untrained_bundle):
    from brain_diffuser_core.features.clip import ClipFeatureExtractor
    from brain_diffuser_core.features.store import FeatureStore
    from brain_diffuser_core.features.vdvae import load_vdvae
    from brain_diffuser_core.seeding import seed_for

    cache, path, _ = untrained_bundle
    stamp = read_demo_stamp(path)
    feats_dir = cache / "demo-features" / f"{stamp['world_sha256'][:12]}-{stamp['models_sha256'][:12]}"
    store = FeatureStore(feats_dir)
    subj = _subject(world, cache, 1)
    ids = np.array([int(subj.test_image_ids[0]), int(subj.train_image_ids[5])])
    assert set(np.concatenate([subj.train_image_ids, subj.test_image_ids])) <= set(store.ids("clip_vision"))
    models = cache / "demo-models-untrained"
    clip = ClipFeatureExtractor.from_pretrained(models / "versatile-diffusion")
    images = np.stack([subj.image(i) for i in ids])
    np.testing.assert_allclose(store.get("clip_vision", ids), clip.vision_embeddings(images), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(store.get("clip_text", ids[:1])[0], clip.text_embeddings(subj.captions(int(ids[0]))),
                               rtol=2e-3, atol=2e-3)
    vdvae = load_vdvae(models / "vdvae.safetensors")
    direct = vdvae.encode(images, seed=[seed_for("vdvae-encode", int(i)) for i in ids]).numpy()
    np.testing.assert_allclose(store.get("vdvae", ids), direct, rtol=2e-3, atol=2e-3)


def test_bad_subjects_are_named(world, untrained_bundle):
    cache, _, _ = untrained_bundle
    with pytest.raises(ValueError, match=r"subset of the world's subjects \[1, 2\]; \[5\]"):
        ensure_demo_bundle(cache, models_dir=cache / "absent-models", world_root=world, subjects=[5])


# ---------------------------------------------------------------------------- model manifest + checks
def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def models(untrained_bundle, tmp_path):
    """A complete models folder (a copy of the untrained fallback) with its MANIFEST.json."""
    cache, _, _ = untrained_bundle
    folder = tmp_path / "models"
    shutil.copytree(cache / "demo-models-untrained", folder)
    (folder / "training.json").write_text("{}")
    (folder / "README.md").write_text("notes")
    write_models_manifest(folder, memo_file=tmp_path / "memo.json")
    return folder


def test_manifest_lists_every_model_file_with_size_and_sha256(models, tmp_path):
    manifest = json.loads((models / MANIFEST_FILE).read_text())
    on_disk = sorted(p.relative_to(models).as_posix() for p in models.rglob("*")
                     if p.is_file() and p.name not in ("training.json", "README.md", MANIFEST_FILE))
    assert sorted(manifest["files"]) == on_disk == sorted(model_files(models))
    assert "vdvae.safetensors" in on_disk and "versatile-diffusion/unet" not in on_disk
    assert any(r.startswith("versatile-diffusion/image_unet/") for r in on_disk)
    for rel, entry in manifest["files"].items():
        assert entry == {"size": (models / rel).stat().st_size, "sha256": _sha(models / rel)}
    assert verify_demo_models(models, memo_file=tmp_path / "memo.json") == manifest["files"]


def test_missing_model_file_is_named_with_restore_and_rebuild_commands(models, world, tmp_path):
    (models / "versatile-diffusion" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(DemoModelsError) as info:
        verify_demo_models(models, memo_file=tmp_path / "memo.json")
    err = info.value
    assert err.problems == {"versatile-diffusion/vae/diffusion_pytorch_model.safetensors": "missing"}
    text = str(err)
    assert str(models) in text and "versatile-diffusion/vae/diffusion_pytorch_model.safetensors: missing" in text
    assert "git checkout -- assets/demo/models" in text
    assert f"python -m brain_diffuser_core world train --out {models}" in text
    # the bundle build refuses it too: no silent fallback to untrained models, no bundle written
    with pytest.raises(DemoModelsError, match="diffusion_pytorch_model.safetensors: missing"):
        ensure_demo_bundle(tmp_path / "c", models_dir=models, world_root=world)
    assert not (tmp_path / "c" / "demo-bundle").exists()
    assert isinstance(err, RuntimeError)


def test_flipped_byte_is_named_corrupt_despite_the_checksum_memo(models, tmp_path, monkeypatch):
    memo = tmp_path / "memo.json"
    verify_demo_models(models, memo_file=memo)  # remembered as good
    hashed = []
    real = demo.sha256_file
    monkeypatch.setattr(demo, "sha256_file", lambda p, *a, **k: hashed.append(p) or real(p, *a, **k))
    verify_demo_models(models, memo_file=memo)
    assert hashed == []  # once per content: nothing re-hashed
    # a new process (empty memory) reads the memo file instead of hashing again
    monkeypatch.setattr(demo, "_MEMO", {})
    monkeypatch.setattr(demo, "_PERSISTED", {})
    verify_demo_models(models, memo_file=memo)
    assert hashed == []

    target = models / "vdvae.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) - 7] ^= 0x01  # one bit of a weight, same size
    target.write_bytes(bytes(data))
    with pytest.raises(DemoModelsError) as info:
        verify_demo_models(models, memo_file=memo)
    assert [p.name for p in hashed] == ["vdvae.safetensors"]  # only the changed file was hashed again
    assert info.value.problems == {"vdvae.safetensors": f"corrupt (sha256 differs from {MANIFEST_FILE})"}
    assert "vdvae.safetensors: corrupt" in str(info.value) and "world train --out" in str(info.value)
    # a truncated file is reported by its size
    cfg = models / "versatile-diffusion" / "text_encoder" / "config.json"
    size = cfg.stat().st_size
    cfg.write_bytes(cfg.read_bytes()[:-3])
    with pytest.raises(DemoModelsError) as info:
        verify_demo_models(models, memo_file=memo)
    assert info.value.problems["versatile-diffusion/text_encoder/config.json"] == (
        f"corrupt (size {size - 3} bytes, {MANIFEST_FILE} says {size})")
    # an unreadable manifest is named as such
    (models / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DemoModelsError, match=f"{MANIFEST_FILE}: corrupt"):
        verify_demo_models(models, memo_file=memo)


def test_partial_folder_without_manifest_names_what_is_missing(models, world, tmp_path):
    (models / MANIFEST_FILE).unlink()
    (models / "versatile-diffusion" / "text_encoder" / "model.safetensors").unlink()
    (models / "vdvae.json").unlink()
    with pytest.raises(DemoModelsError) as info:
        ensure_demo_bundle(tmp_path / "c", models_dir=models, world_root=world)
    assert info.value.problems == {"vdvae.json": "missing",
                                   "versatile-diffusion/text_encoder/model.safetensors": "missing"}
    assert "no MANIFEST.json" in str(info.value)
    # nor can a manifest make such a folder look complete
    with pytest.raises(DemoModelsError, match="vdvae.json: missing"):
        write_models_manifest(models)
    assert not (models / MANIFEST_FILE).exists()


def test_verified_models_build_a_trained_bundle(models, world, tmp_path):
    out = ensure_demo_bundle(tmp_path / "c", models_dir=models, world_root=world, subjects=[1])
    stamp = read_demo_stamp(out)
    assert stamp["models_trained"] is True and stamp["models_sha256"] == models_digest(models)
    memo = json.loads((tmp_path / "c" / demo.CHECKSUMS_FILE).read_text())["files"]
    assert memo[str((models / "vdvae.safetensors").resolve())]["sha256"] == _sha(models / "vdvae.safetensors")


def test_a_full_disk_leaves_no_complete_looking_bundle_and_says_where(models, world, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    cache = tmp_path / "c"
    real = safetensors.torch.save_file
    calls = []

    def full_disk(tensors, filename, *args, **kwargs):
        if ".demo-bundle.tmp" in str(filename):
            calls.append(filename)
            if len(calls) == 2:  # midway through the bundle: the first decoder file was written
                raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(DemoDiskFullError) as info:
        ensure_demo_bundle(cache, models_dir=models, world_root=world, subjects=[1])
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and len(calls) == 2
    assert "disk is full" in str(err) and str(cache) in str(err) and "BRAIN_DIFFUSER_CACHE" in str(err)
    # no bundle, no temporary folder (the empty lock file of the build lock may stay: it holds no data)
    assert not [p.name for p in cache.iterdir() if "demo-bundle" in p.name and p.name != ".demo-bundle.lock"]

    # over an existing bundle (subject 1 only), a failed rebuild for subjects [1, 2] keeps the old one, whose
    # stamp does not match: a later call rebuilds instead of accepting it
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    old = ensure_demo_bundle(cache, models_dir=models, world_root=world, subjects=[1])
    calls.clear()
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(DemoDiskFullError):
        ensure_demo_bundle(cache, models_dir=models, world_root=world, subjects=[1, 2])
    assert [p.name for p in cache.iterdir() if "demo-bundle" in p.name and p.name != ".demo-bundle.lock"] == ["demo-bundle"]
    assert read_demo_stamp(old)["subjects"] == [1]
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert read_demo_stamp(ensure_demo_bundle(cache, models_dir=models, world_root=world))["subjects"] == [1, 2]

    # the world build inside ensure_demo_bundle gets the same explanation; other OSErrors pass unchanged
    import brain_diffuser_core.world.build as wb

    def world_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wb, "ensure_world", world_full)
    with pytest.raises(DemoDiskFullError, match=f"written under {tmp_path / 'w'}.*BRAIN_DIFFUSER_CACHE"):
        ensure_demo_bundle(tmp_path / "w", models_dir=models)
    monkeypatch.setattr(wb, "ensure_world", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(PermissionError):
        ensure_demo_bundle(tmp_path / "w", models_dir=models)


# -------------------------------------------------------------------------------------------- trainers
def test_parse_steps():
    from brain_diffuser_core.world.train import DEFAULT_STEPS, parse_steps

    assert parse_steps("clip=5,unet=7") == {**DEFAULT_STEPS, "clip": 5, "unet": 7}
    assert set(parse_steps("all=2").values()) == {2}
    with pytest.raises(ValueError, match="STAGE=N"):
        parse_steps("vqgan=3")


def test_clip_and_vae_losses_fall_and_training_resumes(world, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    from brain_diffuser_core.tiny_models import make_tiny_vd, vd_configs
    from brain_diffuser_core.world.train import load_train_data, train_clip, train_vae

    images, captions, ids = load_train_data(world)
    assert images.shape == (48, 64, 64, 3) and ids.min() == 6  # train split only (test ids are 0..5)
    vd = make_tiny_vd(tmp_path / "vd")
    tok = CLIPTokenizer.from_pretrained(vd / "tokenizer")
    proc = CLIPImageProcessorPil.from_pretrained(vd / "image_feature_extractor")
    # the same 16 pairs every step (batch = all data): the contrastive loss must fall
    _, losses = train_clip(images[:16], [c[:1] for c in captions[:16]], tok, proc, tmp_path / "w", steps=8,
                           batch_size=16, lr=2e-3, progress=False)
    assert len(losses) == 8 and np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < losses[0]

    vae = AutoencoderKL(**vd_configs("tiny")["vae"])
    _, losses = train_vae(images[:16], vae, tmp_path / "w", steps=6, batch_size=16, lr=3e-3, progress=False)
    assert np.mean(losses[-2:]) < losses[0]
    assert (tmp_path / "w" / "vae.pt").is_file()
    # latents x scaling factor have unit standard deviation over the data
    x = torch.as_tensor(images[:16]).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True) / 127.5 - 1
    with torch.no_grad():
        std = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).std().item()
    assert abs(std - 1.0) < 0.05
    # resuming: a second call continues from step 6 and runs only 2 more steps
    vae2 = AutoencoderKL(**vd_configs("tiny")["vae"])
    _, more = train_vae(images[:16], vae2, tmp_path / "w", steps=8, batch_size=16, progress=False)
    assert len(more) == 2
    # a zero-minute budget runs no step
    _, none = train_vae(images[:16], vae2, tmp_path / "w", steps=100, batch_size=16, minutes=0, progress=False)
    assert none == []


def test_train_demo_models_writes_loadable_models(world, tmp_path):
    from brain_diffuser_core.diffusion import DualGuidedImg2Img, load_versatile_diffusion
    from brain_diffuser_core.features.clip import ClipFeatureExtractor
    from brain_diffuser_core.features.vdvae import load_vdvae
    from brain_diffuser_core.cli.world_train import add_train_action

    # through the CLI action (`world train`), as the lead will run it
    parser = argparse.ArgumentParser()
    add_train_action(parser.add_subparsers())
    args = parser.parse_args(["train", "--out", str(tmp_path / "models"), "--world-root", str(world), "--work",
                              str(tmp_path / "work"), "--steps", "all=2,unet=3", "--threads", "1", "--no-progress",
                              "--generator-scenes", "12"])
    assert args.func(args) == 0
    out = tmp_path / "models"
    record = json.loads((out / "training.json").read_text())
    assert record["generator_images"] == {"world_train": 48, "generator_scenes": 12}
    for stage, n in {"clip": 2, "vdvae": 2, "vae": 2, "unet": 3}.items():
        info = record["stages"][stage]
        assert info["steps"] == n and np.isfinite([info["first_loss"], info["final_loss"]]).all()
    vdvae = load_vdvae(out / "vdvae.safetensors")
    assert vdvae.config.image_size == 64
    comps = load_versatile_diffusion(out / "versatile-diffusion")
    clip = ClipFeatureExtractor.from_pretrained(out / "versatile-diffusion")
    # the exported towers are the trained ones: they differ from the random start in the staged folder's seed
    from brain_diffuser_core.tiny_models import make_tiny_vd

    fresh = ClipFeatureExtractor.from_pretrained(make_tiny_vd(tmp_path / "fresh"))
    grey = np.full((1, 32, 32, 3), 90, np.uint8)
    assert not np.allclose(clip.vision_embeddings(grey), fresh.vision_embeddings(grey))
    # and the exported VD (the demo size: the world's 64 px) runs the dual-guided img2img
    side = DEMO_IMAGE_SIZE
    img = DualGuidedImg2Img(comps)(np.full((1, side, side, 3), 120, np.uint8),
                                   clip.text_embeddings_batch([["a red cup"]]),
                                   clip.vision_embeddings(grey), seeds=[0], num_inference_steps=4,
                                   uncond_text=clip.unconditional_text(), uncond_vision=clip.unconditional_vision())
    assert img.shape == (1, side, side, 3) and img.dtype == np.uint8
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 60e6
    # every training run ends with the manifest the demo verifies
    manifest = json.loads((out / MANIFEST_FILE).read_text())["files"]
    assert sorted(manifest) == sorted(model_files(out)) and "vdvae.safetensors" in manifest
    assert manifest["vdvae.safetensors"]["sha256"] == _sha(out / "vdvae.safetensors")
    verify_demo_models(out, memo_file=tmp_path / "memo.json")
    # `world train --manifest-only` rewrites it for an existing folder, the same
    (out / MANIFEST_FILE).unlink()
    args = parser.parse_args(["train", "--out", str(out), "--manifest-only"])
    assert args.func(args) == 0
    assert json.loads((out / MANIFEST_FILE).read_text())["files"] == manifest

    # --reuse clip,vdvae: a second run keeps those stages' weights and trains only the VAE and the UNet
    args = parser.parse_args(["train", "--out", str(tmp_path / "again"), "--world-root", str(world), "--work",
                              str(tmp_path / "work2"), "--steps", "vae=1,unet=1", "--threads", "1", "--no-progress",
                              "--generator-scenes", "0", "--reuse", "clip,vdvae", "--reuse-from", str(out)])
    assert args.func(args) == 0
    again = tmp_path / "again"
    rec2 = json.loads((again / "training.json").read_text())
    assert rec2["stages"]["clip"] == {"reused_from": str(out)} == rec2["stages"]["vdvae"]
    assert rec2["stages"]["unet"]["steps"] == 1 and all(rec2["trained"].values())
    same = ClipFeatureExtractor.from_pretrained(again / "versatile-diffusion")
    np.testing.assert_array_equal(same.vision_embeddings(grey), clip.vision_embeddings(grey))
    a, b = load_vdvae(again / "vdvae.safetensors").state_dict(), vdvae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --warm-start vae,unet: those stages start from --reuse-from's weights (0 further steps: exactly them)
    args = parser.parse_args(["train", "--out", str(tmp_path / "warm"), "--world-root", str(world), "--work",
                              str(tmp_path / "work3"), "--steps", "vae=0,unet=0", "--threads", "1", "--no-progress",
                              "--generator-scenes", "0", "--reuse", "clip,vdvae", "--warm-start", "vae,unet",
                              "--reuse-from", str(again)])
    assert args.func(args) == 0
    rec3 = json.loads((tmp_path / "warm" / "training.json").read_text())
    assert rec3["stages"]["unet"]["prior_steps"] == 1 == rec3["stages"]["vae"]["prior_steps"]
    for sub in ("vae", "image_unet", "text_unet"):
        new = load_file(tmp_path / "warm" / "versatile-diffusion" / sub / "diffusion_pytorch_model.safetensors")
        old = load_file(again / "versatile-diffusion" / sub / "diffusion_pytorch_model.safetensors")
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new), sub
    with pytest.raises(FileNotFoundError, match="--reuse-from"):
        args = parser.parse_args(["train", "--out", str(tmp_path / "x"), "--world-root", str(world), "--reuse",
                                  "vdvae", "--reuse-from", str(tmp_path / "nowhere")])
        args.func(args)
    with pytest.raises(FileNotFoundError, match="--reuse-from"):
        args = parser.parse_args(["train", "--out", str(tmp_path / "x"), "--world-root", str(world),
                                  "--warm-start", "unet", "--reuse-from", str(tmp_path / "nowhere")])
        args.func(args)
    with pytest.raises(ValueError, match="'reuse' must name stages among"):
        args = parser.parse_args(["train", "--out", str(tmp_path / "x"), "--world-root", str(world), "--reuse",
                                  "unet"])
        args.func(args)


def test_demo_vae_trains_on_windows_and_reconstructs_whole_images(world, tmp_path):
    from diffusers import AutoencoderKL

    from brain_diffuser_core.tiny_models import vd_configs
    from brain_diffuser_core.world.train import load_train_data, train_vae

    images, _, _ = load_train_data(world)
    vae = AutoencoderKL(**vd_configs("demo")["vae"])
    _, losses = train_vae(images[:16], vae, tmp_path / "w", steps=6, batch_size=16, lr=3e-3, progress=False,
                          crop=32)
    assert np.mean(losses[-2:]) < losses[0]
    x = torch.as_tensor(images[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        assert vae.decode(vae.encode(x).latent_dist.mean).sample.shape == (2, 3, 64, 64)  # whole 64 px images
    tiny = AutoencoderKL(**vd_configs("tiny")["vae"])  # has mid-block attention: not fully convolutional
    with pytest.raises(ValueError, match="without mid-block attention"):
        train_vae(images[:4], tiny, tmp_path / "w2", steps=1, crop=16, progress=False)


def test_unet_flows_train_one_attention_path_each_and_leave_the_inference_mix(tmp_path):
    """Versatile Diffusion's flows: a text-to-image item trains only the text attention, an image-variation
    item only the vision attention; the dual blocks are back at the paper's mix after the forward."""
    from diffusers import UNet2DConditionModel
    from diffusers.models import DualTransformer2DModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    from brain_diffuser_core.config import PAPER
    from brain_diffuser_core.tiny_models import vd_configs
    from brain_diffuser_core.world.train import FLOW_SHARES, _DualUNet

    assert sum(FLOW_SHARES.values()) == pytest.approx(1.0) and set(FLOW_SHARES) == {"text", "vision", "dual"}
    cfgs = vd_configs("demo")
    torch.manual_seed(0)
    net = _DualUNet(UNet2DConditionModel(**cfgs["image_unet"]), UNetFlatConditionModel(**cfgs["text_unet"]))
    net.dual()
    latents, t = torch.randn(3, 4, 16, 16), torch.tensor([10, 500, 900])
    cond = torch.randn(3, 77 + 257, cfgs["image_unet"]["cross_attention_dim"])

    def grads(text_weight):
        net.zero_grad(set_to_none=True)
        net(latents, t, cond, text_weight=torch.tensor(text_weight)).square().mean().backward()
        got = {"vision": 0.0, "text": 0.0}
        for name, p in net.image_unet.named_parameters():
            if ".transformers." in name and p.grad is not None:
                got["vision" if ".transformers.0." in name else "text"] += float(p.grad.abs().sum())
        return got

    text_only, vision_only, mixed = grads([1.0, 1.0, 1.0]), grads([0.0, 0.0, 0.0]), grads([1.0, 0.0, 0.4])
    assert text_only["vision"] == 0.0 < text_only["text"]
    assert vision_only["text"] == 0.0 < vision_only["vision"]
    assert mixed["text"] > 0.0 and mixed["vision"] > 0.0
    # per item: an item's prediction under its own flow is what a batch of that flow alone gives it
    with torch.no_grad():
        per_item = net(latents, t, cond, text_weight=torch.tensor([1.0, 0.0, 0.4]))
        alone = [net(latents[i:i + 1], t[i:i + 1], cond[i:i + 1], text_weight=torch.tensor([w]))
                 for i, w in enumerate([1.0, 0.0, 0.4])]
        torch.testing.assert_close(per_item, torch.cat(alone), atol=1e-5, rtol=1e-4)
        # and without text_weight the forward is the paper's inference mix, scalar on every dual block
        mixes = [m.mix_ratio for m in net.image_unet.modules() if isinstance(m, DualTransformer2DModel)]
        assert mixes and all(isinstance(m, float) and m == pytest.approx(1.0 - PAPER.stage2.vision_mix)
                             for m in mixes)
        torch.testing.assert_close(net(latents[2:], t[2:], cond[2:]), alone[2], atol=1e-5, rtol=1e-4)


def test_loop_moving_average_is_checkpointed_and_applied(tmp_path):
    from brain_diffuser_core.world.train import _Loop

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    start = lin.weight.detach().clone()
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    loop = _Loop("lin", lin, tmp_path, lr=0.1, checkpoint_every=0, ema_decay=0.9)
    loop.run(lambda step: torch.nn.functional.mse_loss(lin(x), y), 5, None, progress=False)
    raw = lin.weight.detach().clone()
    # the average of the iterates lies strictly between the start and the raw final weights
    ema = loop.ema["weight"].clone()
    assert not torch.allclose(ema, raw) and not torch.allclose(ema, start)
    assert torch.all((ema - start).abs() <= (raw - start).abs() + 1e-6)
    # a resumed loop reads the same average back; apply_ema copies it into the parameters
    lin2 = torch.nn.Linear(3, 1)
    loop2 = _Loop("lin", lin2, tmp_path, lr=0.1, checkpoint_every=0, ema_decay=0.9)
    assert loop2.step == 5 and torch.equal(lin2.weight, raw) and torch.equal(loop2.ema["weight"], ema)
    loop2.apply_ema()
    assert torch.equal(lin2.weight.detach(), ema)


def test_demo_builds_are_serialised_by_a_lock(tmp_path):
    """A second builder waits for the first (threads here; flock also holds across processes)."""
    import threading
    import time

    from brain_diffuser_core.world.demo import _build_lock

    events = []
    inside = threading.Event()

    def first():
        with _build_lock(tmp_path / "demo-bundle"):
            events.append("first in")
            inside.set()
            time.sleep(0.3)
            events.append("first out")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with _build_lock(tmp_path / "demo-bundle"):
        events.append("second in")
    t.join()
    assert events == ["first in", "first out", "second in"]


def test_training_rate_falls_along_a_cosine_and_resumes_on_it(tmp_path):
    from brain_diffuser_core.world.train import LR_FLOOR, _Loop

    class Stop(Exception):
        pass

    def run(work, stop_at=None):
        """10-step run of a toy loop; returns the learning rate each step ran with (raises Stop at stop_at)."""
        torch.manual_seed(0)
        module = torch.nn.Linear(3, 1)
        loop = _Loop("toy", module, work, lr=0.01, checkpoint_every=0)
        rates = []

        def loss_fn(step):
            if step == stop_at:
                raise Stop
            rates.append(loop.opt.param_groups[0]["lr"])
            return module(torch.ones(2, 3)).pow(2).mean()

        try:
            loop.run(loss_fn, 10, None, progress=False)
        except Stop:
            pass
        return rates

    whole = run(tmp_path / "a")
    expected = [0.01 * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + np.cos(np.pi * k / 10))) for k in range(10)]
    np.testing.assert_allclose(whole, expected, rtol=1e-12)
    assert all(a > b for a, b in zip(whole, whole[1:]))
    # interrupted after 4 steps (the checkpoint holds an optimiser at a fallen rate), then resumed: the rates
    # are the uninterrupted run's, not a cosine restarted from the fallen rate
    assert run(tmp_path / "b", stop_at=4) == whole[:4]
    np.testing.assert_allclose(run(tmp_path / "b"), expected[4:], rtol=1e-12)
