"""brain_diffuser_core.export: reconstruction zips read back pixel for pixel, evaluation folders read back."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from brain_diffuser_core import __version__
from brain_diffuser_core.export import (comparison_rows, evaluation_folder, higher_is_better, load_evaluation,
                                        rank_trials, reconstructions_zip, settings_digest,
                                        write_reconstructions_zip, zip_item)


def _read_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def _images(rng, n, size=16):
    return [rng.integers(0, 256, (size, size + 1, 3), dtype=np.uint8) for _ in range(n)]


def test_zip_holds_every_image_pixel_for_pixel_and_a_manifest(rng, tmp_path):
    orig, s1, fin = _images(rng, 3)
    items = [
        {"id": 2950, "original": orig, "stage1": s1, "final": fin, "seed": np.int64(7),
         "settings": {"strength": np.float32(0.75), "num_inference_steps": 4, "shape": (1, 2)},
         "metrics": {"PixCorr": np.float64(0.25), "CLIP": float("nan")}},
        {"id": "nsd-17", "stage1": fin, "final": None},  # no original, no final: those files are absent
    ]
    data = reconstructions_zip(items, extra={"subject": 1})
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = sorted(zf.namelist())
        assert names == ["2950/final.png", "2950/original.png", "2950/stage1.png", "manifest.json",
                         "nsd-17/stage1.png"]
        for name, image in (("2950/original.png", orig), ("2950/stage1.png", s1), ("2950/final.png", fin),
                            ("nsd-17/stage1.png", fin)):
            np.testing.assert_array_equal(_read_png(zf.read(name)), image)
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["package_version"] == __version__ and manifest["subject"] == 1
    first, second = manifest["items"]
    assert first["id"] == "2950" and first["seed"] == 7
    assert first["settings"] == {"strength": 0.75, "num_inference_steps": 4, "shape": [1, 2]}
    assert first["metrics"] == {"PixCorr": 0.25, "CLIP": None}
    assert first["files"] == {"original": "2950/original.png", "stage1": "2950/stage1.png",
                              "final": "2950/final.png"}
    assert second["files"] == {"stage1": "nsd-17/stage1.png"} and second["seed"] is None
    path = write_reconstructions_zip(items, tmp_path / "out" / "g.zip", extra={"subject": 1})
    assert path.read_bytes()[:2] == b"PK" and zipfile.ZipFile(path).namelist() == zipfile.ZipFile(io.BytesIO(data)).namelist()


def test_zip_item_from_a_reconstruction(rng):
    from brain_diffuser_core.pipeline import Reconstruction

    s1, up, fin, orig = _images(rng, 4)
    rec = Reconstruction(key="subj01/nsd5", seed=11, stage1=s1[:4, :4], stage1_upscaled=up, final=fin,
                         features={}, timings={}, settings={"guidance_scale": 7.5})
    item = zip_item(5, rec, original=orig, metrics={"SSIM": 0.5})
    with zipfile.ZipFile(io.BytesIO(reconstructions_zip([item]))) as zf:
        np.testing.assert_array_equal(_read_png(zf.read("5/stage1.png")), up)  # the image fed to stage 2
        np.testing.assert_array_equal(_read_png(zf.read("5/original.png")), orig)
        entry = json.loads(zf.read("manifest.json"))["items"][0]
    assert entry["seed"] == 11 and entry["settings"] == {"guidance_scale": 7.5} and entry["metrics"] == {"SSIM": 0.5}


@pytest.mark.parametrize("items, message", [
    ([{"stage1": np.zeros((2, 2, 3), np.uint8)}], "must have an 'id'"),
    ([{"id": "../x", "stage1": np.zeros((2, 2, 3), np.uint8)}], "'id' must be"),
    ([{"id": 1, "stage1": np.zeros((2, 2, 3), np.uint8)}] * 2, "appears twice"),
    ([{"id": 1}], "must have a 'stage1'"),
    ([{"id": 1, "stage1": np.zeros((2, 2, 3), np.float32)}], r"'stage1' must be a uint8 image.*float32"),
    ([{"id": 1, "stage1": np.zeros((2, 2, 3), np.uint8), "final": np.zeros((2, 2), np.uint8)}],
     r"'final' must be .*shape \(2, 2\)"),
])
def test_zip_rejects_bad_items_by_name(items, message):
    with pytest.raises(ValueError, match=message):
        reconstructions_zip(items)


def test_rank_trials_best_and_worst_either_direction():
    v = [0.2, np.nan, 0.9, 0.5, 0.9]
    assert rank_trials(v, 2) == [2, 4]  # ties in index order, NaN never picked
    assert rank_trials(v, 2, best=False) == [0, 3]
    assert rank_trials(v, 10) == [2, 4, 3, 0]
    assert rank_trials(v, 1, higher=False) == [0]  # a distance: lower is better
    assert rank_trials(v, 1, higher=False, best=False) == [2]
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        rank_trials(np.zeros((2, 2)), 1)
    assert higher_is_better("CLIP") and higher_is_better("PixCorr")
    assert not higher_is_better("EffNet-Lite0") and not higher_is_better("SwAV")


def test_comparison_rows_line_up_ours_and_published():
    from brain_diffuser_core.metrics import PAPER_TABLE

    rows = comparison_rows({"full": {"PixCorr": 0.1, "EffNet-Lite0": 0.9, "extra": 1.0},
                            "stage1": {"PixCorr": 0.2, "EffNet-Lite0": 0.8, "extra": 2.0}})
    pix = [r for r in rows if r["metric"] == "PixCorr"]
    assert [(r["method"], r["value"]) for r in pix if r["source"] == "ours"] == [("ours (full)", 0.1),
                                                                                 ("ours (stage1)", 0.2)]
    assert {r["method"]: r["value"] for r in pix if r["source"] == "published"}["Brain-Diffuser"] == \
        PAPER_TABLE["Brain-Diffuser"]["PixCorr"]
    eff = [r for r in rows if r["metric"] == "EffNet-Lite0" and r["source"] == "published"]
    assert eff and all(not r["comparable"] for r in eff)  # a stand-in: shown, flagged
    assert eff[0]["value"] == PAPER_TABLE["Brain-Diffuser"]["EffNet-B"]
    assert [r["source"] for r in rows if r["metric"] == "extra"] == ["ours", "ours"]


def test_evaluation_folder_digests(tmp_path):
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "manifest.json").write_text('{"a": 1}')
    s = {"rows": [0, 1], "steps": 4}
    f1 = evaluation_folder(tmp_path / "cache", b, 1, s)
    assert f1.parent.name == "subj01" and f1.parents[2] == tmp_path / "cache" / "evaluations"
    assert evaluation_folder(tmp_path / "cache", b, 1, {"steps": 4, "rows": (0, 1)}) == f1  # order, tuple
    assert evaluation_folder(tmp_path / "cache", b, 2, s).parent.name == "subj02"
    assert settings_digest({**s, "steps": 5}) != f1.name
    (b / "manifest.json").write_text('{"a": 2}')  # another bundle -> another folder
    assert evaluation_folder(tmp_path / "cache", b, 1, s) != f1
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        evaluation_folder(tmp_path, tmp_path / "nope", 1, s)


class _FakeSubject:
    """The attributes evaluate_bundle reads of a Subject: 3 test images with random fMRI."""

    def __init__(self, n_voxels, rng):
        self.subject = 1
        self.test_image_ids = np.array([30, 10, 20])
        self.test_fmri = rng.standard_normal((3, n_voxels)).astype(np.float32)
        self._images = {int(i): rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for i in self.test_image_ids}

    def image(self, i):
        return self._images[int(i)]


def test_load_evaluation_reads_back_what_evaluate_bundle_wrote(tmp_path, rng):
    from brain_diffuser_core.evaluation import evaluate_bundle
    from brain_diffuser_core.metrics import pixcorr
    from brain_diffuser_core.pipeline import BrainDiffuser
    from brain_diffuser_core.tiny_bundle import make_tiny_bundle

    bd = BrainDiffuser(make_tiny_bundle(tmp_path / "bundle", subjects=(1,)), device="cpu")
    subj = _FakeSubject(bd.bundle.subject_info(1)["n_voxels"], rng)
    out = tmp_path / "eval"
    assert load_evaluation(out) is None  # nothing yet
    summary = evaluate_bundle(bd, subj, out, rows=[0, 2], variants=("full", "stage1"), networks=(),
                              num_inference_steps=4)
    res = load_evaluation(out)
    assert res.variants == ["full", "stage1"] and res.metrics == ["PixCorr", "SSIM", "SSIM (paper's 1-D columns)"]
    assert res.image_ids.tolist() == [30, 20] and res.info["subject"] == 1
    for v in res.variants:
        assert res.summary[v] == pytest.approx(summary[v], rel=1e-5)
        assert res.per_trial[v]["SSIM"].mean() == pytest.approx(summary[v]["SSIM"], rel=1e-4)
    # the per-trial values belong to the listed images
    recon = np.stack([_read_png(p.read_bytes()) for p in res.images["stage1"]])
    truth = np.stack([subj.image(i) for i in res.image_ids])
    np.testing.assert_allclose(res.per_trial["stage1"]["PixCorr"], pixcorr(recon, truth, 24), rtol=1e-4, atol=1e-6)
    # per_image.csv that disagrees with metrics.json is named
    text = (out / "per_image.csv").read_text().replace("stage1,", "other,")
    (out / "per_image.csv").write_text(text)
    with pytest.raises(ValueError, match="per_image.csv must hold per-trial rows"):
        load_evaluation(out)


def test_comparison_rows_set_the_published_ssim_beside_the_column_wise_one():
    from brain_diffuser_core.metrics import PAPER_TABLE, SSIM_COLUMNS_LABEL

    rows = comparison_rows({"full": {"SSIM": 0.4, SSIM_COLUMNS_LABEL: 0.3}}, paper_rows=["Brain-Diffuser"])
    published = {r["metric"]: r for r in rows if r["source"] == "published"}
    assert published[SSIM_COLUMNS_LABEL]["value"] == PAPER_TABLE["Brain-Diffuser"]["SSIM"]
    assert published[SSIM_COLUMNS_LABEL]["comparable"] and not published["SSIM"]["comparable"]
