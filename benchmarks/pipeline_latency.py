"""Seconds per reconstruction (stage 1, stage 2, total) at batch 1 and 8, float16 and float32, and peak memory.

On a CUDA GPU it builds the REAL-size architectures with random weights (VDVAE ImageNet-64, 125 M parameters;
Versatile Diffusion image and text UNets and VAE; 512 px, 37 of 50 DDIM steps, guidance 7.5) through the same
classes the real weights load into. On CPU it runs the tiny configs to show the path works (figures are not
comparable to the GPU ones). The baseline measured in the same run is float32 at batch 1: the ratio column is
(float32 batch-1 seconds per image) / (this row's seconds per image).

Targets (issue 3, H100): <= 1.0 s per 512 px reconstruction at batch 1, float16, guidance on; <= 12 GB peak.

    python benchmarks/pipeline_latency.py [--size auto|real|tiny] [--batches 1,8] [--repeats 2] [--threads 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brain_diffuser_core.config import PAPER  # noqa: E402
from brain_diffuser_core.pipeline import GenerativeModels  # noqa: E402


def build_models(size: str, device: torch.device, dtype: torch.dtype, workdir: Path) -> GenerativeModels:
    """Random-weight models of the given size on ``device``/``dtype``."""
    from brain_diffuser_core.diffusion import DualGuidedImg2Img, VDComponents
    from brain_diffuser_core.features.vdvae import VDVAE, VDVAEConfig

    if size == "tiny":
        from brain_diffuser_core.tiny_bundle import make_tiny_bundle

        bundle = make_tiny_bundle(workdir / "bundle", models_folder=workdir / "models")
        from brain_diffuser_core.bundle import load_bundle

        return GenerativeModels.from_references(load_bundle(bundle).models, device=device, dtype=dtype)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    from brain_diffuser_core.tiny_models import vd_configs

    cfg = vd_configs("real")
    torch.manual_seed(0)
    vdvae = VDVAE(VDVAEConfig.imagenet64()).to(device).eval()
    comps = VDComponents(
        image_unet=UNet2DConditionModel(**cfg["image_unet"]).to(device, dtype).eval(),
        text_unet=UNetFlatConditionModel(**cfg["text_unet"]).to(device, dtype).eval(),
        vae=AutoencoderKL(**cfg["vae"]).to(device, dtype).eval(),
        scheduler=DDIMScheduler(**cfg["scheduler"]), device=device, dtype=dtype)
    d = int(cfg["image_unet"]["cross_attention_dim"])
    rng = np.random.default_rng(0)
    uncond_t = rng.standard_normal((PAPER.stage2.text_tokens, d)).astype(np.float32) * 0.05
    uncond_v = rng.standard_normal((PAPER.stage2.vision_tokens, d)).astype(np.float32) * 0.05
    return GenerativeModels(vdvae, DualGuidedImg2Img(comps), uncond_t, uncond_v)


def random_features(models: GenerativeModels, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = models.img2img.cross_attention_dim
    return {
        "vdvae": rng.standard_normal((n, models.vdvae.feature_dim())).astype(np.float32),
        "clip_text": rng.standard_normal((n, PAPER.stage2.text_tokens, d)).astype(np.float32) * 0.05,
        "clip_vision": rng.standard_normal((n, PAPER.stage2.vision_tokens, d)).astype(np.float32) * 0.05,
    }


def time_batch(models: GenerativeModels, batch: int, repeats: int) -> dict[str, float]:
    feats = random_features(models, batch, seed=batch)
    models.generate(feats, seeds=list(range(batch)))  # warm-up (kernels, allocator)
    best = None
    for r in range(repeats):
        t0 = time.perf_counter()
        _, _, _, t1, t2 = models.generate(feats, seeds=[r * 100 + i for i in range(batch)])
        total = time.perf_counter() - t0
        if best is None or total < best["total"]:
            best = {"stage1": t1 / batch, "stage2": t2 / batch, "total": total / batch}
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="auto", choices=("auto", "real", "tiny"))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs only; default 2)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size if args.size != "auto" else ("real" if cuda else "tiny")
    if not cuda:
        torch.set_num_threads(args.threads)
    dtypes = [torch.float32, torch.float16] if cuda else [torch.float32]
    batches = [int(b) for b in args.batches.split(",")]
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; size: {size}; {PAPER.stage2.denoising_steps} of {PAPER.stage2.num_inference_steps} "
          f"DDIM steps, guidance {PAPER.stage2.guidance_scale}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            models = build_models(size, device, dtype, Path(tmp))
            print(f"built {size} models in {str(dtype).replace('torch.', '')}; stage-2 images {models.image_size} px")
            for batch in batches:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t = time_batch(models, batch, args.repeats)
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
                rows.append({"dtype": str(dtype).replace("torch.", ""), "batch": batch, **t, "peak_gib": peak})
            del models
            if cuda:
                torch.cuda.empty_cache()
    base = next(r["total"] for r in rows if r["dtype"] == "float32" and r["batch"] == batches[0])
    print(f"\n{'dtype':8} {'batch':>5} {'stage1 s/img':>13} {'stage2 s/img':>13} {'total s/img':>12} "
          f"{'peak GiB':>9} {'speed-up vs fp32 b' + str(batches[0]):>20}")
    for r in rows:
        print(f"{r['dtype']:8} {r['batch']:5d} {r['stage1']:13.3f} {r['stage2']:13.3f} {r['total']:12.3f} "
              f"{r['peak_gib']:9.2f} {base / r['total']:19.2f}x")
    if size == "real":
        fp16_b1 = next((r for r in rows if r["dtype"] == "float16" and r["batch"] == 1), None)
        if fp16_b1:
            print(f"\ntarget <= 1.0 s and <= 12 GB at float16 batch 1: {fp16_b1['total']:.3f} s, "
                  f"{fp16_b1['peak_gib']:.2f} GiB")
    else:
        print("\n(tiny configs on CPU: shows the path runs; the latency targets apply to the real size on a GPU)")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "size": size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
