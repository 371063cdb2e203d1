"""How far the demo's generator can go: reconstructions from the TRUE features of the test images (the ceiling:
perfect decoders) beside those from the features the bundle's ridge decoders predict from the (simulated) fMRI
of the same images, scored in one run by:

* ``Category``: the independent judge (ImageNet EfficientNet-Lite0 + a linear probe fitted on fresh world
  scenes, :mod:`brain_diffuser_core.world.judge`): the reconstruction shows its original's category;
* ``CLIP``: 2-way identification with the demo's own CLIP; PixCorr and SSIM at the world's 64 px;
* ``HF``: the high-frequency energy fraction (:func:`brain_diffuser_core.world.measures.hf_energy_fraction`),
  printed for the originals too (stage 1 should stay within 1.5x of theirs).

    python benchmarks/demo_generator_ceiling.py [--subjects 1,2,5,7] [--n 120] [--threads 1] [--cache-dir DIR]
        [--models-dir DIR]
        [--sheet trials.png]

It also prints the Category score per original category (which categories the generator cannot draw), and
``--sheet`` writes a contact sheet of the first 16 test trials of the first subject: original | stage 1 | final
(decoded), with the TRUE-feature final beside them.

Uses the cached demo (``ensure_demo_bundle``: the MiniNSD world, the demo models, their extracted features).
The TRUE-feature rows do not depend on the subject (the same images, features and seeds); the decoded rows are
printed per subject and as the mean over subjects.
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _generate(diffuser, feats, ids, seeds, batch=8):
    recs = []
    for s in range(0, len(ids), batch):
        recs += diffuser.generate({k: v[s:s + batch] for k, v in feats.items()}, keys=[str(i) for i in ids[s:s + batch]],
                                  seeds=seeds[s:s + batch])
    return {"full": np.stack([r.final for r in recs]), "stage1": np.stack([r.stage1_upscaled for r in recs])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="1", help="comma list of world subjects (default: 1)")
    ap.add_argument("--n", type=int, default=120, help="test images (default: all 120 of the default world)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--models-dir", default=None,
                    help="demo models to measure (default: assets/demo/models), e.g. a `world train --out` folder")
    ap.add_argument("--sheet", default=None, metavar="PNG",
                    help="write 16 test trials of the first subject: original | stage 1 | final | TRUE-feature final")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from brain_diffuser_core.config import FEATURE_NAMES, cache_root
    from brain_diffuser_core.evaluation import world_category_score
    from brain_diffuser_core.features.store import FeatureStore
    from brain_diffuser_core.metrics import evaluate_images
    from brain_diffuser_core.nsd import load_subject
    from brain_diffuser_core.pipeline import BrainDiffuser
    from brain_diffuser_core.seeding import seed_for
    from brain_diffuser_core.world.build import ensure_world
    from brain_diffuser_core.world.demo import ensure_demo_bundle
    from brain_diffuser_core.world.measures import hf_energy_fraction

    cache = cache_root() if args.cache_dir is None else args.cache_dir
    bundle = ensure_demo_bundle(cache, models_dir=args.models_dir)
    world = ensure_world(cache)
    diffuser = BrainDiffuser(bundle, device="cpu")
    subjects = [int(s) for s in args.subjects.split(",")]
    first = load_subject(world, subjects[0], cache_dir=f"{cache}/nsd", progress=False)
    n = min(args.n, len(first.test_image_ids))
    ids = [int(i) for i in first.test_image_ids[:n]]
    stores = glob.glob(f"{cache}/demo-features/*")
    if len(stores) != 1:
        raise SystemExit(f"expected one feature store under {cache}/demo-features; found {stores}")
    store = FeatureStore(stores[0])
    truths = np.stack([first.image(i) for i in ids])
    kwargs = {"clip": {"path": diffuser.bundle.clip_location(), "device": "cpu"}}
    seeds = [seed_for("trial", i) for i in ids]
    judge = world_category_score(world, cache)
    labels = np.load(Path(world) / "world" / "image_labels.npy", allow_pickle=False)[np.asarray(ids)]
    from brain_diffuser_core.world.scenes import CATEGORIES
    print(f"independent judge: {judge.describe()}", flush=True)

    per_category: dict[str, dict[str, float]] = {}

    def score(images, label=None):
        summary, _ = evaluate_images(images, truths, ["clip"], network_kwargs=kwargs, size=truths.shape[1])
        right = judge(images, ids)
        if label is not None:
            per_category[label] = {c: float(right[labels == k].mean()) for k, c in enumerate(CATEGORIES)
                                   if (labels == k).any()}
        return {"PixCorr": summary["PixCorr"], "SSIM": summary["SSIM"], "CLIP": summary["CLIP"],
                "Category": float(right.mean()), "HF": float(np.mean(hf_energy_fraction(images)))}

    rows = {"originals": {"Category": float(judge(truths, ids).mean()),
                          "HF": float(np.mean(hf_energy_fraction(truths)))}}
    rows["originals through the VAE (encode + decode)"] = score(_vae_round_trip(truths, args.models_dir),
                                                                "VAE round trip")
    t0 = time.perf_counter()
    true_feats = {f: store.get(f, ids).reshape((n,) + diffuser.bundle.feature_shape(f)) for f in FEATURE_NAMES}
    true_images = _generate(diffuser, true_feats, ids, seeds)
    for variant, images in true_images.items():
        rows[f"TRUE features (ceiling), {variant}"] = score(images, f"TRUE, {variant}")
    print(f"TRUE features: {n} images in {time.perf_counter() - t0:.1f} s", flush=True)
    decoded_rows = {}
    for s in subjects:
        subject = first if s == subjects[0] else load_subject(world, s, cache_dir=f"{cache}/nsd", progress=False)
        t0 = time.perf_counter()
        decoded = diffuser.predict_features(subject.test_fmri[:n], s)
        decoded_images = _generate(diffuser, decoded, ids, seeds)
        for variant, images in decoded_images.items():
            decoded_rows[(s, variant)] = rows[f"decoded, subj {s}, {variant}"] = score(images, f"subj {s}, {variant}")
        if args.sheet and s == subjects[0]:
            _write_sheet(args.sheet, truths, decoded_images, true_images["full"], s)
        print(f"decoded subj {s}: {n} images in {time.perf_counter() - t0:.1f} s", flush=True)
    if len(subjects) > 1:
        for variant in ("full", "stage1"):
            per = [decoded_rows[(s, variant)] for s in subjects]
            rows[f"decoded, mean of subj {args.subjects}, {variant}"] = {k: float(np.mean([p[k] for p in per]))
                                                                         for k in per[0]}
    print(f"\n{n} test images; CLIP = 2-way identification with the demo's own CLIP; Category = independent judge")
    print(f"{'features, variant':45s} {'PixCorr':>8s} {'SSIM':>8s} {'CLIP':>8s} {'Category':>9s} {'HF':>7s}")
    for label, r in rows.items():
        cells = [f"{r['PixCorr']:8.3f}" if "PixCorr" in r else f"{'-':>8s}",
                 f"{r['SSIM']:8.3f}" if "SSIM" in r else f"{'-':>8s}",
                 f"{100 * r['CLIP']:7.1f}%" if "CLIP" in r else f"{'-':>8s}",
                 f"{100 * r['Category']:8.1f}%", f"{r['HF']:7.3f}"]
        print(f"{label:45s} " + " ".join(cells))
    print(f"\nCategory per original category ({', '.join(f'{c}: {int((labels == k).sum())}' for k, c in enumerate(CATEGORIES))} images)")
    print(f"{'features, variant':20s} " + " ".join(f"{c:>8s}" for c in CATEGORIES))
    for label, cats in per_category.items():
        print(f"{label:20s} " + " ".join(f"{100 * cats[c]:7.0f}%" if c in cats else f"{'-':>8s}" for c in CATEGORIES))
    base = rows[f"decoded, subj {subjects[0]}, full"]["Category"]
    ceil = rows["TRUE features (ceiling), full"]["Category"]
    print(f"full pipeline Category: decoded (subj {subjects[0]}) {100 * base:.1f}% / ceiling {100 * ceil:.1f}%; "
          f"stage-1 HF / originals' HF = {rows['TRUE features (ceiling), stage1']['HF'] / rows['originals']['HF']:.2f} "
          f"(TRUE) and {rows[f'decoded, subj {subjects[0]}, stage1']['HF'] / rows['originals']['HF']:.2f} (decoded)")


def _vae_round_trip(images, models_dir=None):
    """uint8 (n, H, W, 3) -> the demo VAE's reconstruction of each (posterior mean), uint8, same shape."""
    import torch
    from diffusers import AutoencoderKL

    from brain_diffuser_core.world.demo import DEFAULT_MODELS_DIR
    from brain_diffuser_core.world.train import _resize, to_uint8

    models = DEFAULT_MODELS_DIR if models_dir is None else Path(models_dir)
    vae = AutoencoderKL.from_pretrained(models / "versatile-diffusion", subfolder="vae").eval()
    x = _resize(images, int(vae.config.sample_size))
    with torch.no_grad():
        return np.concatenate([to_uint8(vae.decode(vae.encode(x[s:s + 32]).latent_dist.mean).sample)
                               for s in range(0, len(x), 32)])


def _write_sheet(path, truths, decoded, true_full, subject, n=16, per_row=4):
    """PNG of ``n`` trials, ``per_row`` to a row, each as original | stage 1 | final | TRUE-feature final."""
    from PIL import Image, ImageDraw

    size, gap = truths.shape[1], 4
    n = min(n, len(truths))
    rows = -(-n // per_row)
    cell_w = 4 * size + gap
    sheet = Image.new("RGB", (per_row * cell_w + gap, 14 + rows * (size + gap) + gap), "white")
    ImageDraw.Draw(sheet).text((gap, 1), f"subj {subject}: original | stage 1 | final | from TRUE features",
                               fill="black")
    for i in range(n):
        x, y = gap + (i % per_row) * cell_w, 14 + gap + (i // per_row) * (size + gap)
        tiles = [truths[i], decoded["stage1"][i], decoded["full"][i], true_full[i]]
        for j, tile in enumerate(tiles):
            sheet.paste(Image.fromarray(np.asarray(tile, np.uint8)).resize((size, size)), (x + j * size, y))
    sheet = sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST)
    sheet.save(path)
    print(f"contact sheet written to {path}")


if __name__ == "__main__":
    main()
