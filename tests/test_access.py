"""brain_diffuser_core.access: the allowed roots of a shared server (paths with '..', symlinks out, a manifest that
points outside; one message for missing and forbidden)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from brain_diffuser_core import access
from brain_diffuser_core.access import AccessError, FolderPolicy


@pytest.mark.parametrize("address, loop", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
                                           ("127.0.1.1", True), ("0.0.0.0", False), ("", False), (None, False),
                                           ("192.168.1.5", False), ("lab-gpu.example.org", False)])
def test_is_loopback(address, loop):
    assert access.is_loopback(address) is loop


def _bundle(folder: Path, models_path: str = "models/vdvae.th", files=("subj01_vdvae.safetensors",)) -> Path:
    folder.mkdir(parents=True)
    for rel in files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"x")
    (folder / "manifest.json").write_text(json.dumps({
        "format_version": 1, "features": {}, "subjects": {}, "files": {rel: "0" for rel in files},
        "models": {"vdvae": {"path": models_path}, "clip": {"hf_id": "openai/clip-vit-large-patch14"}}}))
    return folder


@pytest.fixture
def tree(tmp_path):
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    allowed.mkdir()
    (secret / "nsddata").mkdir(parents=True)
    _bundle(secret / "bundle")
    return allowed, secret


def test_loopback_opens_any_folder(tree):
    allowed, secret = tree
    policy = FolderPolicy("127.0.0.1", roots=[allowed])
    assert not policy.restricted
    assert policy.bundle_folder(str(secret / "bundle")) == secret / "bundle"


def test_missing_and_forbidden_get_the_same_message(tree):
    allowed, secret = tree
    policy = FolderPolicy("0.0.0.0", roots=[allowed])
    messages = []
    for text in (str(secret / "bundle"), str(secret / "no-such-folder"), str(allowed / "no-such-folder"),
                 str(allowed / "file.txt")):
        with pytest.raises(AccessError) as err:
            policy.bundle_folder(text)
        messages.append(str(err.value).replace(repr(text), "<entered>"))
    assert len(set(messages)) == 1, messages
    assert str(secret) not in messages[0] and str(allowed) not in messages[0]  # the roots are not revealed
    assert "BRAIN_DIFFUSER_ROOTS" in messages[0]


def test_dotdot_and_symlinks_out_are_refused(tree):
    allowed, secret = tree
    policy = FolderPolicy("0.0.0.0", roots=[allowed])
    (allowed / "sub").mkdir()
    with pytest.raises(AccessError, match=r"must not contain '\.\.'"):
        policy.bundle_folder(str(allowed / "sub" / ".." / ".." / "secret" / "bundle"))
    with pytest.raises(AccessError, match=r"must not contain '\.\.'"):  # even one that would stay inside
        policy.nsd_root(str(allowed / "sub" / ".."))
    os.symlink(secret / "bundle", allowed / "link")
    with pytest.raises(AccessError, match="outside the folders the presenter allowed"):
        policy.bundle_folder(str(allowed / "link"))
    # an NSD root inside whose nsddata/ is a symlink out
    (allowed / "nsd").mkdir()
    os.symlink(secret / "nsddata", allowed / "nsd" / "nsddata")
    with pytest.raises(AccessError, match="outside the folders"):
        policy.nsd_root(str(allowed / "nsd"))
    (allowed / "nsd2" / "nsddata").mkdir(parents=True)
    assert policy.nsd_root(str(allowed / "nsd2")) == (allowed / "nsd2").resolve()


def test_bundle_manifest_pointing_outside_is_refused(tree):
    allowed, secret = tree
    policy = FolderPolicy("0.0.0.0", roots=[allowed])
    ok = _bundle(allowed / "ok")
    assert policy.bundle_folder(str(ok)) == ok.resolve()
    out_model = _bundle(allowed / "b1", models_path=str(secret / "bundle" / "subj01_vdvae.safetensors"))
    with pytest.raises(AccessError, match="model 'vdvae' path"):
        policy.bundle_folder(str(out_model))
    out_rel = _bundle(allowed / "b2", models_path="../../secret/vdvae.th")
    with pytest.raises(AccessError, match="model 'vdvae' path"):
        policy.bundle_folder(str(out_rel))
    # a checksummed file reached through '..' (load_bundle would probe it on disk)
    (allowed / "b3").mkdir()
    (allowed / "b3" / "manifest.json").write_text(json.dumps({"files": {"../../secret/bundle/manifest.json": "0"}}))
    with pytest.raises(AccessError, match="file '../../secret"):
        policy.bundle_folder(str(allowed / "b3"))
    # a Hub id that is really a local folder
    (allowed / "b4").mkdir()
    (allowed / "b4" / "manifest.json").write_text(json.dumps({"files": {}, "models": {"clip": {"hf_id": str(secret)}}}))
    with pytest.raises(AccessError, match="model 'clip' hf_id"):
        policy.bundle_folder(str(allowed / "b4"))


def test_default_roots_are_the_cache_the_demo_and_the_start_folders(tmp_path, monkeypatch):
    bundle = _bundle(tmp_path / "start" / "bundle", models_path=str(tmp_path / "weights" / "vd"))
    monkeypatch.setenv("BRAIN_DIFFUSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BRAIN_DIFFUSER_BUNDLE", str(bundle))
    monkeypatch.setenv("BRAIN_DIFFUSER_NSD_ROOT", str(tmp_path / "nsd"))
    monkeypatch.delenv("BRAIN_DIFFUSER_ROOTS", raising=False)
    roots = access.allowed_roots()
    assert set(roots) == {(tmp_path / p).resolve() for p in ("cache", "start/bundle", "nsd", "weights/vd")} \
        | {access.DEMO_ASSETS.resolve()}
    monkeypatch.setenv("BRAIN_DIFFUSER_ROOTS", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b"), ""]))
    assert access.allowed_roots() == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())
