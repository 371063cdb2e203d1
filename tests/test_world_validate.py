"""In-silico validation of ROI-optimal scenes (world/validate.py and its measures / validate_judges /
validate_report modules, `world validate`)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from brain_diffuser_core.world.scenes import FIELD_DEG, generate_scene, generate_scenes, scene_seed
from brain_diffuser_core.world.measures import (colourfulness, contrast_centroid_deg, hf_energy_fraction, rms_contrast,
                                                to_world_size)
from brain_diffuser_core.world.validate_judges import ClipJudge, DecodedCategoryCheck, ObserverJudge
from brain_diffuser_core.world.validate_report import ValidationReport


# --------------------------------------------------------------------------------------- image measures
def _grating(cycles_per_image: float, size: int = 64) -> np.ndarray:
    x = np.arange(size) / size
    row = 127.5 + 100 * np.sin(2 * np.pi * cycles_per_image * x)
    return np.repeat(np.tile(row, (size, 1))[..., None], 3, axis=2).round().astype(np.uint8)


def test_hf_fraction_texture_vs_flat_vs_grating_frequencies():
    flat = np.full((64, 64, 3), 128, np.uint8)
    checker = ((np.indices((64, 64)).sum(0) // 2) % 2 * 255).astype(np.uint8)
    texture = np.repeat(checker[..., None], 3, axis=2)
    # 1.5 cpd over 8.4 deg = 12.6 cycles per image: a 24-cycle grating is all above, a 3-cycle one all below
    fine, coarse = _grating(24), _grating(3)
    hf = hf_energy_fraction(np.stack([flat, texture, fine, coarse]))
    assert hf.dtype == np.float32 and hf.shape == (4,)
    assert hf[0] == 0.0
    assert hf[1] > 0.9 and hf[2] > 0.9
    assert hf[3] < 0.05
    # a lower cutoff counts the coarse grating's power as high
    assert hf_energy_fraction(coarse, cutoff_cpd=0.1)[0] > 0.9


def test_colourfulness_matches_hasler_suesstrunk_by_hand():
    grey = np.full((8, 8, 3), 90, np.uint8)
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = (200, 40, 40)
    img[:, 4:] = (40, 200, 40)
    r, g, b = (img[..., k].astype(float).ravel() for k in range(3))
    rg, yb = r - g, (r + g) / 2 - b
    want = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    got = colourfulness(np.stack([grey, img]))
    assert got[0] == pytest.approx(0.0, abs=1e-6)
    assert got[1] == pytest.approx(want, rel=1e-5)
    assert want > 100  # a red/green split is very colourful


def test_rms_contrast_is_the_grey_images_sd():
    flat = np.full((8, 8, 3), 90, np.uint8)
    split = np.zeros((8, 8, 3), np.uint8)
    split[:, 4:] = 255  # half black, half white: grey 0 and 255, sd 127.5
    tinted = np.zeros((8, 8, 3), np.uint8)
    tinted[:, 4:] = (255, 0, 0)  # a red half: Rec. 601 grey 0.299 * 255
    got = rms_contrast(np.stack([flat, split, tinted]))
    assert got.dtype == np.float32
    assert got[0] == pytest.approx(0.0, abs=1e-6)
    assert got[1] == pytest.approx(127.5, rel=1e-5)
    assert got[2] == pytest.approx(0.299 * 255 / 2, rel=1e-4)


def _dot(cx: float, cy: float, size: int = 64, r: int = 3) -> np.ndarray:
    img = np.full((size, size, 3), 128, np.uint8)
    yy, xx = np.indices((size, size))
    m = (xx + 0.5 - cx * size) ** 2 + (yy + 0.5 - cy * size) ** 2 <= r * r
    img[m] = 250
    return img


def test_contrast_centroid_moves_with_the_object():
    centre, left, corner = _dot(0.5, 0.5), _dot(0.25, 0.5), _dot(0.12, 0.12)
    ecc = contrast_centroid_deg(np.stack([centre, left, corner, np.full((64, 64, 3), 77, np.uint8)]))
    assert ecc[0] == pytest.approx(3 * FIELD_DEG / 64, abs=0.15)  # a centred dot: its edge, 3 px out
    assert ecc[1] == pytest.approx(0.25 * FIELD_DEG, abs=0.3)  # 2.1 deg left of centre
    assert ecc[2] == pytest.approx(math.hypot(0.38, 0.38) * FIELD_DEG, abs=0.4)
    assert ecc[0] < ecc[1] < ecc[2]
    assert np.isnan(ecc[3])  # no contrast, no centroid
    assert to_world_size(np.zeros((1, 128, 128, 3), np.uint8)).shape == (1, 64, 64, 3)


def test_image_checks_name_the_input():
    with pytest.raises(ValueError, match="'images' must be uint8 RGB"):
        hf_energy_fraction(np.zeros((2, 8, 8), np.float32))


# ---------------------------------------------------------------------------------------------- judges
@pytest.fixture(scope="module")
def observer_judge():
    from brain_diffuser_core.world.observer import Observer

    return ObserverJudge.fit({1: Observer(1)}, generate_scenes(240, seed=1))


@pytest.mark.parametrize("category", ["face", "body", "place", "word"])
def test_observer_judge_recognises_held_out_scenes_from_pixels(observer_judge, category):
    scenes = [generate_scene(scene_seed(i, 77), category) for i in range(12)]
    labels = observer_judge.classify(np.stack([s.image for s in scenes]))  # pixels only: no scene graph
    assert sum(lab == category for lab in labels) >= 8, labels  # chance: 3 of 12
    z = observer_judge.scores(np.stack([s.image for s in scenes]), [1])
    assert z.shape == (12, 4) and z.dtype == np.float32


def test_observer_judge_rejects_unknown_subject(observer_judge):
    with pytest.raises(ValueError, match="'subjects' must be a non-empty subset of \\[1\\]"):
        observer_judge.scores(np.zeros((1, 64, 64, 3), np.uint8), [3])


def test_clip_judge_nearest_centroid():
    def embed(images):  # mean colour: red images are "face", blue ones "place"
        return images.reshape(len(images), -1, 3).mean(1)

    reds = np.zeros((3, 8, 8, 3), np.uint8)
    reds[..., 0] = (200, 220, 240)[0]
    blues = np.zeros((3, 8, 8, 3), np.uint8)
    blues[..., 2] = 230
    judge = ClipJudge.fit(embed, np.concatenate([reds, blues]), ["face"] * 3 + ["place"] * 3)
    probe = np.zeros((2, 8, 8, 3), np.uint8)
    probe[0, ..., 0], probe[0, ..., 2] = 180, 40
    probe[1, ..., 0], probe[1, ..., 2] = 30, 160
    assert judge.categories == ("face", "place")
    assert judge.classify(probe) == ["face", "place"]


def test_decoded_category_check_centres_before_the_nearest_centroid():
    # both categories point the same way before centring: only the centred centroids tell them apart
    feats = {"clip_text": np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0], [3.0, 0.0]], np.float32).reshape(4, 1, 2)}
    check = DecodedCategoryCheck.fit_features(feats, ["face", "face", "place", "place"])
    assert check.categories == ("face", "place")
    np.testing.assert_allclose(check.means["clip_text"], [2.0, 0.0])
    assert check.classify("clip_text", np.array([[[2.5, 0.0]], [[1.2, 0.3]]])) == ["place", "face"]
    with pytest.raises(ValueError, match="'name' must be one of \\['clip_text'\\]"):
        check.classify("clip_vision", np.zeros((1, 2)))
    with pytest.raises(ValueError, match="must hold 2 values each"):
        check.classify("clip_text", np.zeros((1, 3)))


def _nearest_centroid(calib: np.ndarray, labels: list[str], probe: np.ndarray) -> str:
    """Independent nearest centred centroid (cosine), one probe, plain loops."""
    x = calib.reshape(len(calib), -1).astype(np.float64)
    m = x.mean(0)
    p = probe.reshape(-1).astype(np.float64) - m
    best, best_cos = None, -np.inf
    for c in sorted(set(labels)):
        cen = np.mean([x[i] - m for i in range(len(x)) if labels[i] == c], axis=0)
        cos = float(p @ cen / (np.linalg.norm(p) * np.linalg.norm(cen)))
        if cos > best_cos:
            best, best_cos = c, cos
    return best


# ---------------------------------------------------------------------------------------------- report
def _rec(roi, subject, k, observer=None, pref=None, hf=0.1, ecc=2.0):
    return {"roi": roi, "subject": subject, "seed": k, "key": f"{roi}/{k}", "preferred": pref,
            "observer": observer, "clip": None, "hf_fraction": hf, "colourfulness": 10.0, "ecc_centroid_deg": ecc}


def test_report_aims_are_computed_from_the_numbers(tmp_path):
    recs = [_rec("faces", "subj01", k, "face" if k < 13 else "body", "face") for k in range(16)]
    recs += [_rec("places", "subj01", k, "place", "place") for k in range(3)]  # 100% but only 3 seeds
    recs.append(_rec("places", "subj01", 3, "face", "place"))  # a places scene the judge calls a face
    recs += [_rec("V1", "subj01", k, hf=0.4) for k in range(2)] + [_rec("V4", "subj01", k, hf=0.2) for k in range(2)]
    for i, band in enumerate(["ecc0pt5", "ecc1", "ecc2"]):
        recs += [_rec(band, "subj01", k, ecc=1.0 + i) for k in range(2)]
    rep = ValidationReport(rois=["faces", "places", "V1", "V4", "ecc0pt5", "ecc1", "ecc2"], subjects=["subj01"],
                           n_seeds=16, judge="observer", records=recs, models_trained=False)
    aims = {a["aim"].split(":")[0]: a for a in rep.aims()}
    assert aims["faces"]["value"] == pytest.approx(13 / 16) and aims["faces"]["met"] is True
    assert aims["places"]["value"] == 0.75 and aims["places"]["met"] is False
    # the same judge on the other category ROIs' scenes (V1/V4/ecc scenes carry no judged label here)
    assert aims["faces"]["other_rois_fraction"] == pytest.approx(1 / 4)
    assert aims["places"]["other_rois_fraction"] == 0.0
    hf_aim = next(a for a in rep.aims() if a["aim"].startswith("V1"))
    assert hf_aim["met"] is True and hf_aim["value"] == {"V1": pytest.approx(0.4), "V4": pytest.approx(0.2)}
    ecc_aim = next(a for a in rep.aims() if a["aim"].startswith("contrast"))
    assert ecc_aim["value"] == [1.0, 2.0, 3.0] and ecc_aim["met"] is True
    text = rep.format_table()
    assert "[MET] subj01   faces" in text and "[not met] subj01   places" in text and "UNTRAINED" in text
    # no decoder-level check ran (no CLIP): n/a, and no decoded aim
    summ = {r["roi"]: r for r in rep.summary()}
    assert summ["faces"]["decoded_text_category"] == "n/a" == summ["V1"]["decoded_vision_category"]
    assert summ["faces"]["decoded_text_is_preferred"] is None
    assert not any("decoded" in a["aim"] for a in rep.aims()) and "dec text" in text
    # with it: the category ROIs' decoded text category is checked against the preferred one
    rep.decoded = {("faces", "subj01"): {"clip_text": "face", "clip_vision": "place"},
                   ("places", "subj01"): {"clip_text": "word", "clip_vision": "place"},
                   ("V1", "subj01"): {"clip_text": "texture", "clip_vision": "texture"}}
    summ = {r["roi"]: r for r in rep.summary()}
    assert (summ["faces"]["decoded_text_category"], summ["faces"]["decoded_vision_category"]) == ("face", "place")
    assert summ["faces"]["decoded_text_is_preferred"] is True and summ["places"]["decoded_text_is_preferred"] is False
    assert summ["V1"]["decoded_text_is_preferred"] is None and summ["V1"]["decoded_text_category"] == "texture"
    dec = {a["aim"].split(":")[0]: a for a in rep.aims() if "decoded" in a["aim"]}
    assert set(dec) == {"faces", "places"}
    assert dec["faces"]["met"] is True and dec["places"]["met"] is False and dec["places"]["value"] == "word"
    text = rep.format_table()
    assert "[not met] subj01   places: decoded CLIP-text features nearest the place centroid" in text
    assert "nearest word" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("faces "))
    assert "face" in line.split()[5:] and "place" in line.split()


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    from brain_diffuser_core.world.build import build_world
    from brain_diffuser_core.world.demo import ensure_demo_bundle

    root = tmp_path_factory.mktemp("world") / "mininsd"
    build_world(root, n_train=48, n_test=6, subjects=[1, 2])
    cache = tmp_path_factory.mktemp("cache")
    bundle = ensure_demo_bundle(cache, models_dir=cache / "absent-models", world_root=root)
    return root, cache, bundle


def test_cli_validate_end_to_end_writes_the_report(small_bundle, tmp_path, capsys):
    from brain_diffuser_core.__main__ import main

    root, cache, bundle = small_bundle
    out = tmp_path / "report"
    rois = ["V1", "V4", "faces", "ecc0pt5", "ecc4+"]
    rc = main(["world", "validate", "--bundle", str(bundle), "--seeds", "2", "--steps", "2", "--out", str(out),
               "--judge-scenes", "3",
               "--rois", ",".join(rois), "--subjects", "1,average", "--calibration", "48", "--device", "cpu",
               "--cache-dir", str(cache / "nsd"), "--no-progress"])
    assert rc in (0, None)
    printed = capsys.readouterr().out
    assert "UNTRAINED" in printed and "faces" in printed and "aims" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["models_trained"] is False
    assert report["subjects"] == ["subj01", "average"] and report["rois"] == rois
    recs = report["records"]
    assert len(recs) == len(rois) * 2 * 2
    face_recs = [r for r in recs if r["roi"] == "faces"]
    assert all(r["preferred"] == "face" and r["observer"] in ("face", "body", "place", "word") for r in face_recs)
    assert all(0.0 <= r["hf_fraction"] <= 1.0 and r["colourfulness"] >= 0 for r in recs)
    # the bundle's (untrained) CLIP loads, so the CLIP judge labels every image with a world category
    assert all(r["clip"] in ("face", "body", "place", "word", "object", "texture") for r in recs)
    assert "nearest centroid over 6 categories" in report["clip_note"]
    # the independent judge labels every image too, and says how well it does on held-out fresh scenes
    assert all(r["independent"] in ("face", "body", "place", "word", "object", "texture") for r in recs)
    assert "EfficientNet-Lite0" in report["independent_note"] and "correct on 6 other" in report["independent_note"]
    # nothing claims the category aim with 2 seeds
    assert all(not a["met"] for a in report["aims"] if a["aim"].startswith("faces: >="))
    summ = {(r["roi"], r["subject"]): r for r in report["summary"]}
    assert summ[("faces", "average")]["n_voxels"] > summ[("faces", "subj01")]["n_voxels"] > 0

    # decoder level: each (roi, subject) has the decoded categories, and they match an independent nearest
    # centred centroid over the bundle CLIP's features of the same 48 calibration scenes
    cats = {"face", "body", "place", "word", "object", "texture"}
    assert all(r["decoded_text_category"] in cats and r["decoded_vision_category"] in cats for r in report["summary"])
    assert "dec text" in printed and "decoder-level check" in printed
    from brain_diffuser_core.bundle import load_bundle
    from brain_diffuser_core.features.clip import ClipFeatureExtractor
    from brain_diffuser_core.nsd import load_subject
    from brain_diffuser_core.pipeline import BrainDiffuser
    from brain_diffuser_core.world.validate_judges import world_calibration_scenes

    clip = ClipFeatureExtractor.from_pretrained(load_bundle(bundle).models["versatile_diffusion"]["path"])
    scenes = world_calibration_scenes(root, 48)
    labels = [sc.category for sc in scenes]
    calib = {"clip_text": clip.text_embeddings_batch([sc.captions for sc in scenes]),
             "clip_vision": clip.vision_embeddings(np.stack([sc.image for sc in scenes]))}
    bd = BrainDiffuser(bundle, device="cpu")
    subs = {s: load_subject(root, s, cache_dir=cache / "nsd", progress=False) for s in (1, 2)}
    for roi, label, members in [("faces", "subj01", [1]), ("V1", "average", [1, 2])]:
        feats = bd.pattern_features({s: subs[s].synthetic_pattern({roi: 1.0}) for s in members})
        for name, col in (("clip_text", "decoded_text_category"), ("clip_vision", "decoded_vision_category")):
            assert summ[(roi, label)][col] == _nearest_centroid(calib[name], labels, feats[name][0]), (roi, name)
    dec = [a for a in report["aims"] if a["aim"].startswith("faces: decoded")]
    assert [a["subject"] for a in dec] == ["subj01", "average"]
    assert all(a["met"] == (summ[("faces", a["subject"])]["decoded_text_category"] == "face") for a in dec)

    with open(out / "per_seed.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(recs) and {r["roi"] for r in rows} == set(rois)
    from PIL import Image

    for roi in ("V1", "V4", "faces", "ecc0pt5", "ecc4plus"):
        im = Image.open(out / "sheets" / f"{roi}.png")
        assert im.size[0] > 2 * 96 and im.size[1] > 2 * 96  # 2 seeds x 2 subject rows


def test_cli_validate_rejects_subjects_outside_the_bundle(small_bundle, tmp_path):
    from brain_diffuser_core.pipeline import BrainDiffuser
    from brain_diffuser_core.world.validate import validate_bundle

    root, cache, bundle = small_bundle
    bd = BrainDiffuser(bundle, device="cpu")
    with pytest.raises(ValueError, match="'subjects' must be"):
        validate_bundle(bd, root, subjects=[5], n_seeds=1, cache_dir=cache / "nsd")
    with pytest.raises(ValueError, match="'judge' must be one of"):
        validate_bundle(bd, root, judge="human", n_seeds=1, cache_dir=cache / "nsd")


def test_decoder_check_is_na_when_the_bundle_clip_does_not_load(small_bundle, monkeypatch):
    from brain_diffuser_core.features.clip import ClipFeatureExtractor
    from brain_diffuser_core.pipeline import BrainDiffuser
    from brain_diffuser_core.world.validate import validate_bundle

    root, cache, bundle = small_bundle
    bd = BrainDiffuser(bundle, device="cpu")

    def fail(*args, **kwargs):
        raise OSError("no CLIP here")

    monkeypatch.setattr(ClipFeatureExtractor, "from_pretrained", fail)  # the towers are gone after loading
    rep = validate_bundle(bd, root, rois=["faces"], subjects=[1], n_seeds=1, judge_scenes=3,
                          n_calibration=24, cache_dir=cache / "nsd", run_stage2=False)
    (row,) = rep.summary()
    assert row["decoded_text_category"] == "n/a" == row["decoded_vision_category"]
    assert row["clip_preferred_fraction"] is None and rep.decoded == {}
    assert "no CLIP here" in rep.decoded_note and "no CLIP here" in rep.clip_note
    assert not any("decoded" in a["aim"] for a in rep.aims())


def test_world_calibration_scenes_are_the_worlds_train_images(small_bundle):
    from brain_diffuser_core.world.validate_judges import world_calibration_scenes

    root = small_bundle[0]
    scenes = world_calibration_scenes(root, 24)
    recs = {r["seed"]: r for r in json.loads((root / "world" / "images.json").read_text())["images"]}
    assert len(scenes) == 24
    assert {s.category for s in scenes} == {"face", "body", "place", "word", "object", "texture"}
    for s in scenes:
        rec = recs[s.seed]
        assert rec["split"] == "train" and rec["category"] == s.category
        assert [o["kind"] for o in rec["objects"]] == [o.kind for o in s.objects]
    with pytest.raises(FileNotFoundError, match="images.json"):
        world_calibration_scenes(root / "nowhere")


def test_differential_contrast_centroid_moves_with_the_added_ring_not_the_shared_noise(rng):
    from brain_diffuser_core.world.measures import differential_contrast_centroids

    h = 64
    yy, xx = np.mgrid[:h, :h]
    r_deg = np.hypot(yy + 0.5 - h / 2, xx + 0.5 - h / 2) * 8.4 / h
    bands = {}
    for k, (lo, hi) in enumerate([(0.0, 0.8), (1.0, 1.8), (2.2, 3.0), (3.2, 4.0)]):
        ring = (r_deg >= lo) & (r_deg < hi)
        imgs = []
        for s in range(6):
            noise = rng.normal(0, 40, (h, h, 3))  # strong i.i.d. noise shared by every band
            checker = 60 * (((yy // 2 + xx // 2) % 2) * 2 - 1)[..., None] * ring[..., None]
            imgs.append(np.clip(128 + noise + checker, 0, 255).astype(np.uint8))
        bands[f"b{k}"] = np.stack(imgs)
    diff = list(differential_contrast_centroids(bands).values())
    assert all(b > a for a, b in zip(diff, diff[1:])), diff
    # the plain centroid is dominated by the noise everywhere and barely moves
    plain = [float(np.nanmean(contrast_centroid_deg(v))) for v in bands.values()]
    assert plain[-1] - plain[0] < 0.5 * (diff[-1] - diff[0])
    with pytest.raises(ValueError, match=">= 2 bands"):
        differential_contrast_centroids({"b0": bands["b0"]})


def test_differential_contrast_centroid_reads_where_a_band_s_contrast_is_not_how_much():
    """A band drawing the inner ring at a third of another's contrast sits where that one does (the form
    before 2026-12-04, which subtracted the bands' mean profile unscaled, read it NaN: below the mean at every
    ring), and the outer band stays outward."""
    from brain_diffuser_core.world.measures import differential_contrast_centroids

    h = 64
    yy, xx = np.mgrid[:h, :h]
    r_deg = np.hypot(yy + 0.5 - h / 2, xx + 0.5 - h / 2) * 8.4 / h
    checker = (((yy // 2 + xx // 2) % 2) * 2 - 1)[..., None]

    def band(lo, hi, amplitude):
        ring = ((r_deg >= lo) & (r_deg < hi))[..., None]
        img = np.clip(128 + amplitude * checker * ring, 0, 255).astype(np.uint8).repeat(3, axis=-1)
        return img[None].repeat(2, axis=0)

    diff = differential_contrast_centroids({"inner strong": band(0.0, 1.0, 90), "outer": band(2.5, 3.5, 90),
                                            "inner faint": band(0.0, 1.0, 30)})
    assert np.isfinite(list(diff.values())).all(), diff
    assert diff["inner faint"] == pytest.approx(diff["inner strong"], abs=1e-6)
    assert diff["outer"] > diff["inner strong"] + 2.0, diff


# --------------------------------------------------------------------------------------- module layout
def test_validate_re_exports_the_public_names_of_its_sibling_modules_unchanged():
    """Old imports (``from brain_diffuser_core.world.validate import X``) keep giving the very same objects."""
    from brain_diffuser_core.world import measures, validate, validate_judges, validate_report

    for home in (measures, validate_judges, validate_report):
        for name in home.__all__:
            assert name in validate.__all__, name
            assert getattr(validate, name) is getattr(home, name), name
    assert all(hasattr(validate, name) for name in validate.__all__)
