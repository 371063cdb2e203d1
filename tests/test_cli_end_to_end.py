"""The whole command-line flow on a small MiniNSD world with tiny models of the real architectures:
world build -> prepare -> extract -> fit -> reconstruct -> evaluate."""
import json

import numpy as np
import pytest
import torch

from brain_diffuser_core.__main__ import main
from brain_diffuser_core.features.store import FeatureStore
from brain_diffuser_core.features.vdvae import VDVAE, VDVAEConfig, save_vdvae
from brain_diffuser_core.tiny_models import make_tiny_vd


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    world, cache = tmp / "world", tmp / "cache"
    assert main(["world", "build", "--out", str(world), "--n-train", "48", "--n-test", "6", "--subjects", "1",
                 "--no-progress"]) == 0
    assert main(["prepare", "--nsd-root", str(world), "--subject", "1", "--cache-dir", str(cache),
                 "--no-progress"]) == 0
    vd = make_tiny_vd(tmp / "models" / "vd")
    torch.manual_seed(0)
    vdvae = tmp / "models" / "vdvae.safetensors"
    save_vdvae(VDVAE(VDVAEConfig.tiny(32)).eval(), vdvae)
    feats = tmp / "features"
    assert main(["extract", "--nsd-root", str(world), "--subject", "1", "--out", str(feats), "--vdvae", str(vdvae),
                 "--clip", str(vd), "--device", "cpu", "--cache-dir", str(cache)]) == 0
    models = tmp / "models.json"
    models.write_text(json.dumps({"vdvae": {"path": str(vdvae)}, "versatile_diffusion": {"path": str(vd)}}))
    bundle = tmp / "bundle"
    assert main(["fit", "--nsd-root", str(world), "--subject", "1", "--features", str(feats), "--out", str(bundle),
                 "--models-json", str(models), "--cache-dir", str(cache), "--alpha-vdvae", "10",
                 "--alpha-clip-text", "10", "--alpha-clip-vision", "10"]) == 0
    return dict(tmp=tmp, world=world, cache=cache, feats=feats, bundle=bundle)


def test_extract_wrote_every_image_and_resumes(flow, capsys):
    store = FeatureStore(flow["feats"])
    assert sorted(store.names()) == ["clip_text", "clip_vision", "vdvae"]
    assert len(store.ids("vdvae")) == 54
    assert store.shape("vdvae") == (VDVAEConfig.tiny(32).feature_dim(),)
    assert store.shape("clip_text")[0] == 77 and store.shape("clip_vision")[0] == 257


def test_reconstruct_writes_pngs_and_resumes(flow, capsys):
    out = flow["tmp"] / "recon"
    args = ["reconstruct", "--bundle", str(flow["bundle"]), "--nsd-root", str(flow["world"]), "--subject", "1",
            "--trials", "0-1", "--out", str(out), "--steps", "4", "--device", "cpu", "--cache-dir", str(flow["cache"])]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == 2
    for image_id, info in manifest["images"].items():
        for kind in ("original", "stage1", "final"):
            assert (out / f"{image_id}_{kind}.png").exists()
    first = (out / f"{image_id}_final.png").read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert "0 to run" in capsys.readouterr().out
    assert (out / f"{image_id}_final.png").read_bytes() == first


def test_reconstruct_rejects_bad_rows(flow):
    args = ["reconstruct", "--bundle", str(flow["bundle"]), "--nsd-root", str(flow["world"]), "--subject", "1",
            "--trials", "0-99", "--out", str(flow["tmp"] / "bad"), "--device", "cpu", "--cache-dir", str(flow["cache"])]
    assert main(args) == 2


def test_evaluate_prints_the_table_beside_the_paper(flow, capsys):
    out = flow["tmp"] / "eval"
    assert main(["evaluate", "--bundle", str(flow["bundle"]), "--nsd-root", str(flow["world"]), "--subject", "1",
                 "--out", str(out), "--steps", "4", "--networks", "efficientnet_lite0", "--device", "cpu",
                 "--cache-dir", str(flow["cache"]), "--judge-scenes", "2"]) == 0
    text = capsys.readouterr().out
    assert "Brain-Diffuser (published)" in text and "ours (full) subj 1" in text
    assert "independent judge: ImageNet EfficientNet-Lite0" in text and "| Category |" in text
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert set(summary) == {"full", "stage1", "stage2_only"}
    for row in summary.values():
        assert -1 <= row["PixCorr"] <= 1 and np.isfinite(row["EffNet-Lite0"])
        assert row["Category"] in {k / 6 for k in range(7)}  # 6 test images, each right or wrong
    assert len((out / "per_image.csv").read_text().splitlines()) == 1 + 3 * 6


def test_paper_flag_reaches_reconstruct_and_evaluate(flow, capsys):
    out = flow["tmp"] / "recon_paper"
    assert main(["reconstruct", "--bundle", str(flow["bundle"]), "--nsd-root", str(flow["world"]), "--subject", "1",
                 "--trials", "0-1", "--out", str(out), "--steps", "4", "--device", "cpu", "--paper",
                 "--cache-dir", str(flow["cache"])]) == 0
    run = json.loads((out / "manifest.json").read_text())["run"]
    assert run["mode"] == "paper" and run["rescale"] == "paper"
    ev = flow["tmp"] / "eval_paper"
    assert main(["evaluate", "--bundle", str(flow["bundle"]), "--nsd-root", str(flow["world"]), "--subject", "1",
                 "--out", str(ev), "--steps", "4", "--networks", "", "--variants", "stage1", "--device", "cpu",
                 "--paper", "--cache-dir", str(flow["cache"]), "--judge-scenes", "2"]) == 0
    info = json.loads((ev / "metrics.json").read_text())
    assert info["mode"] == "paper" and info["rescale"] == "paper"
    assert {"PixCorr", "SSIM", "SSIM (2-D)"} <= set(info["summary"]["stage1"])  # (+ "Category" on a world)
    assert "SSIM (paper's 1-D columns)" not in info["summary"]["stage1"]
    assert "ours (stage1, paper mode) subj 1" in capsys.readouterr().out
