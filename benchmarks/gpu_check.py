"""The real path's speed on one GPU, against diffusers' own pipeline, in one short run (<= 6 min on an H100/H200).

On CUDA it builds the REAL-size architectures with random weights (``tiny_models.vd_configs("real")``:
Versatile Diffusion image + text UNets and KL-VAE at 512 px; VDVAE ``VDVAEConfig.imagenet64()``) through the
same classes the real weights load into, and prints:

1. seconds per image for stage 1 (VDVAE decode + bicubic upscale; VDVAE runs in float32, as the library does),
   stage 2 (img2img: 37 of 50 DDIM steps, guidance 7.5) and both, at batch 1 and 8, for float16 and bfloat16
   (the faster one is marked), with peak GPU memory;
2. diffusers' own ``VersatileDiffusionDualGuidedPipeline`` on the same inputs: the same UNets, VAE, scheduler and
   condition embeddings (its encoders bypassed per instance, its dual blocks switched to the fixed class since it
   crashes as shipped), 37 DDIM steps from noise with guidance 7.5, batch 1, float16; printed as a ratio
   (diffusers' seconds / ours for stage 2);
3. ridge (:func:`~brain_diffuser_core.ridge.fit_ridge`, ``backend="torch_cuda"``) at one subject's full shape:
   X 8,859 x 15,724, the three decoders' 91,168 + 59,136 + 197,376 targets (synthetic, generated on the GPU),
   float16 weights: seconds per decoder and in all, and the fraction of a float32 GEMM's rate timed here.

Targets (issue 14, H100-class): one 512 px reconstruction (37 steps, CFG) <= 0.5 s and <= 12 GB peak; >= 1.5x
diffusers' pipeline.

On CPU it runs a tiny version of the same three parts (tiny configs, ``--cpu-steps`` DDIM steps, a small ridge)
so that a test keeps the script alive; its figures say nothing about GPUs.

    python benchmarks/gpu_check.py [--budget-s 330] [--out FILE.json]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from brain_diffuser_core.config import PAPER  # noqa: E402
from pipeline_latency import build_models, random_features  # noqa: E402

#: one subject's full shape (subject 1: 8,859 train images x 15,724 nsdgeneral voxels) and the three decoders
RIDGE_FULL = {"n": 8859, "p": 15724, "targets": {"vdvae": 91168, "clip_text": 77 * 768, "clip_vision": 257 * 768}}
RIDGE_TINY = {"n": 120, "p": 200, "targets": {"vdvae": 600, "clip_text": 77 * 4, "clip_vision": 257 * 4}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def time_ours(models, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Best of ``repeats`` (after one warm-up) of both stages; seconds per image."""
    from dataclasses import replace

    feats = random_features(models, batch, seed=batch)
    kw = {"stage2": replace(PAPER.stage2, num_inference_steps=steps)}
    models.generate(feats, seeds=list(range(batch)), **kw)
    best = None
    for r in range(repeats):
        t0 = time.perf_counter()
        _, _, _, t1, t2 = models.generate(feats, seeds=[100 * r + i for i in range(batch)], **kw)
        _sync(models.device)
        total = time.perf_counter() - t0
        if best is None or total < best["both"]:
            best = {"stage1": t1 / batch, "stage2": t2 / batch, "both": total / batch}
    return best


def diffusers_pipeline(models, workdir: Path):
    """diffusers' dual-guided pipeline around OUR modules (same weights), its prompt encoders bypassed."""
    from diffusers.models import DualTransformer2DModel
    from diffusers.pipelines.deprecated.versatile_diffusion import VersatileDiffusionDualGuidedPipeline

    from brain_diffuser_core.diffusion import DualGuidedImg2Img, MaskAwareDualTransformer2D
    from brain_diffuser_core.features.clip import ClipFeatureExtractor
    from brain_diffuser_core.tiny_models import make_tiny_clip

    # tiny encoders on the same device (the pipeline takes its device from its first modules); never called
    clip = ClipFeatureExtractor.from_pretrained(make_tiny_clip(workdir / "clip"), device=models.device)
    img = models.img2img
    comps = img.components
    # our image UNet is already dual (DualGuidedImg2Img converted it around the same transformers): say so, or
    # the pipeline's __init__ would allocate fresh dual blocks and convert again
    comps.image_unet.register_to_config(dual_cross_attention=True)
    pipe = VersatileDiffusionDualGuidedPipeline(
        tokenizer=clip.tokenizer, image_feature_extractor=clip.image_processor, text_encoder=clip.text_encoder,
        image_encoder=clip.image_encoder, image_unet=comps.image_unet, text_unet=comps.text_unet, vae=comps.vae,
        scheduler=type(comps.scheduler).from_config(comps.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.image_unet.modules():  # per instance: the class itself is untouched
        if type(m) is DualTransformer2DModel:
            m.__class__ = MaskAwareDualTransformer2D
    assert isinstance(img, DualGuidedImg2Img)
    return pipe


def time_diffusers(pipe, models, steps: int, repeats: int) -> float:
    """Seconds per image of diffusers' pipeline (batch 1, 37 steps, CFG 7.5) on our embeddings."""
    from PIL import Image

    feats = random_features(models, 1, seed=1)
    dev, dt = models.device, models.dtype
    text = torch.cat([torch.as_tensor(models.uncond_text)[None], torch.as_tensor(feats["clip_text"])]).to(dev, dt)
    vision = torch.cat([torch.as_tensor(models.uncond_vision)[None],
                        torch.as_tensor(feats["clip_vision"])]).to(dev, dt)
    pipe._encode_text_prompt = lambda *a, **k: text  # the same conditions as ours, [uncond; cond]
    pipe._encode_image_prompt = lambda *a, **k: vision
    size = models.image_size
    dummy = Image.new("RGB", (size, size))
    hw = size // models.img2img.vae_scale_factor

    def once(seed):
        latents = torch.randn(1, 4, hw, hw, generator=torch.Generator().manual_seed(seed)).to(dev, dt)
        pipe(prompt="x", image=dummy, text_to_image_strength=1.0 - PAPER.stage2.vision_mix, height=size, width=size,
             num_inference_steps=steps, guidance_scale=PAPER.stage2.guidance_scale, latents=latents,
             output_type="np")
        _sync(dev)

    once(0)
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        once(r + 1)
        best = min(best, time.perf_counter() - t0)
    return best


def build_on(size: str, device: torch.device, dtype: torch.dtype, workdir: Path):
    """:func:`pipeline_latency.build_models`, with the real-size modules created on the GPU itself (random
    initialisation of ~2 B parameters on the CPU takes minutes) and the scheduler made on the CPU as usual."""
    from brain_diffuser_core.diffusion import paper_scheduler

    if device.type != "cuda":
        return build_models(size, device, dtype, workdir)
    with torch.device(device):
        models = build_models(size, device, dtype, workdir)
    models.img2img.components.scheduler = paper_scheduler()
    return models


def convert(models, dtype: torch.dtype):
    """The same modules in another dtype (stage 2; VDVAE stays float32), as new GenerativeModels."""
    from brain_diffuser_core.diffusion import DualGuidedImg2Img, VDComponents
    from brain_diffuser_core.pipeline import GenerativeModels

    c = models.img2img.components
    comps = VDComponents(image_unet=c.image_unet.to(dtype=dtype), text_unet=c.text_unet.to(dtype=dtype),
                         vae=c.vae.to(dtype=dtype), scheduler=c.scheduler, device=c.device, dtype=dtype)
    return GenerativeModels(models.vdvae, DualGuidedImg2Img(comps), models.uncond_text, models.uncond_vision)


def diffusers_part(res: dict, models, denoise: int, batches, repeats: int, workdir: Path, log) -> None:
    device = models.device
    pipe = diffusers_pipeline(models, workdir)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_diff = time_diffusers(pipe, models, denoise, repeats)
    dt = str(models.dtype).replace("torch.", "")
    ours = next(r for r in res["rows"] if r["batch"] == batches[0] and r["dtype"] == dt)
    res["diffusers"] = {"dtype": dt, "s": t_diff, "peak_gib": _peak_gib(device), "ours_stage2_s": ours["stage2"],
                        "ratio": t_diff / ours["stage2"]}
    log(f"  diffusers' dual-guided pipeline, {dt}, {denoise} steps, batch 1: {t_diff:.3f} s/img (ours, stage 2: "
        f"{ours['stage2']:.3f}) -> ours {t_diff / ours['stage2']:.2f}x faster; peak {res['diffusers']['peak_gib']:.2f} GiB")


def gemm_tflops(device: torch.device, size: int) -> float:
    """float32 GEMM rate (TFLOP/s) of this device, best of 3 (TF32 off: the ridge runs in float32)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e12


def ridge_check(device: torch.device, shape: dict, log) -> dict:
    """fit_ridge of the three decoders at ``shape`` with synthetic targets made on ``device``."""
    from brain_diffuser_core.ridge import factorise, fit_ridge

    backend = "torch_cuda" if device.type == "cuda" else "torch"
    n, p = shape["n"], shape["p"]
    g = torch.Generator(device=device).manual_seed(0)
    k = min(256, n // 4)
    Z = torch.randn(n, k, device=device, generator=g)
    X = Z @ torch.randn(k, p, device=device, generator=g) / k ** 0.5 + 1.5 * torch.randn(n, p, device=device,
                                                                                       generator=g)
    X = (X - X.mean(0)) / X.std(0)
    _sync(device)
    t0 = time.perf_counter()
    fact = factorise(X, backend=backend, method="kernel")
    _sync(device)
    out = {"factorise_s": time.perf_counter() - t0, "fits": {}}
    flops = 2.0 * n * n * p
    for name, T in shape["targets"].items():
        def Y(start, stop, _name=name):
            gg = torch.Generator(device=device).manual_seed(hash((_name, start)) % 2**31)
            B = torch.randn(k, stop - start, device=device, generator=gg)
            return Z @ B + torch.randn(n, stop - start, device=device, generator=gg)

        t0 = time.perf_counter()
        dec = fit_ridge(fact, Y, PAPER.ridge_alpha(name), n_targets=T, loo_stats=1000, n_targets_batch=8192)
        _sync(device)
        dt = time.perf_counter() - t0
        m = min(1000, n)
        flops += n ** 3 * 4 / 3 + 2.0 * p * n * n + T * (2.0 * p * n + 2.0 * m * n)
        out["fits"][name] = {"n_targets": T, "s": dt, "gib": dec.nbytes / 2**30}
        log(f"  ridge {name:11s} {T:7d} targets: {dt:7.2f} s")
        del dec
    out["total_s"] = out["factorise_s"] + sum(f["s"] for f in out["fits"].values())
    out["tflop"] = flops / 1e12
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip what is left once this much has passed")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpu-steps", type=int, default=8, help="DDIM steps of the CPU/tiny run (GPU: the paper's 50)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads on CPU (default 1)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(args.threads)
    size = "real" if cuda else "tiny"
    steps = PAPER.stage2.num_inference_steps if cuda else args.cpu_steps
    denoise = int(steps * PAPER.stage2.strength)
    batches = [int(b) for b in args.batches.split(",")]
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads), tiny configs"
    res: dict = {"device": name, "size": size, "steps": steps, "rows": [], "skipped": []}

    def log(msg: str) -> None:
        print(msg, flush=True)

    def left() -> bool:
        return time.perf_counter() - start < args.budget_s

    log(f"device: {name}; {size} architectures, random weights; {denoise} of {steps} DDIM steps, "
        f"guidance {PAPER.stage2.guidance_scale}")
    dtypes = [torch.float16, torch.bfloat16] if cuda else [torch.float32]
    with tempfile.TemporaryDirectory() as tmp:
        models = None
        for k, dtype in enumerate(dtypes):
            if not left():
                res["skipped"].append(f"pipeline {dtype}")
                continue
            # built once (in the first dtype, on the device), then converted: a second build costs minutes
            models = build_on(size, device, dtype, Path(tmp)) if models is None else convert(models, dtype)
            for batch in batches:
                if not left():
                    res["skipped"].append(f"pipeline {dtype} batch {batch}")
                    continue
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t = time_ours(models, batch, steps, args.repeats)
                row = {"dtype": str(dtype).replace("torch.", ""), "batch": batch, **t, "peak_gib": _peak_gib(device)}
                res["rows"].append(row)
                log(f"  ours {row['dtype']:8s} batch {batch}: stage 1 {t['stage1']:.3f}  stage 2 {t['stage2']:.3f}  "
                    f"both {t['both']:.3f} s/img  peak {row['peak_gib']:.2f} GiB")
            if k == 0:  # diffusers' pipeline on the first dtype's models (float16 on a GPU)
                if left():
                    diffusers_part(res, models, denoise, batches, args.repeats, Path(tmp), log)
                else:
                    res["skipped"].append("diffusers pipeline")
        del models
    if cuda:
        torch.cuda.empty_cache()
    if left():
        shape = RIDGE_FULL if cuda else RIDGE_TINY
        rate = gemm_tflops(device, 8192 if cuda else 512)
        r = ridge_check(device, shape, log)
        r["gemm_tflops"] = rate
        r["fraction_of_gemm"] = r["tflop"] / r["total_s"] / rate
        res["ridge"] = r
        log(f"  ridge, three decoders at n={shape['n']}, p={shape['p']}: {r['total_s']:.1f} s in all (factorise "
            f"{r['factorise_s']:.1f} s), {r['tflop']:.1f} TFLOP -> {r['tflop'] / r['total_s']:.1f} TFLOP/s = "
            f"{100 * r['fraction_of_gemm']:.0f}% of this device's float32 GEMM ({rate:.1f} TFLOP/s)")
    else:
        res["skipped"].append("ridge")

    log("")
    log(f"{'':10s} {'dtype':9s} {'batch':>5s} {'stage1 s/img':>13s} {'stage2 s/img':>13s} {'both s/img':>11s} "
        f"{'peak GiB':>9s}")
    for r in res["rows"]:
        log(f"{'ours':10s} {r['dtype']:9s} {r['batch']:5d} {r['stage1']:13.3f} {r['stage2']:13.3f} {r['both']:11.3f} "
            f"{r['peak_gib']:9.2f}")
    if "diffusers" in res:
        d = res["diffusers"]
        log(f"{'diffusers':10s} {d['dtype']:9s} {1:5d} {'-':>13s} {d['s']:13.3f} {'-':>11s} "
            f"{d['peak_gib']:9.2f}   ours stage 2 is {d['ratio']:.2f}x faster")
    for b in batches:
        rows = [r for r in res["rows"] if r["batch"] == b]
        if len(rows) > 1:
            best = min(rows, key=lambda r: r["both"])
            log(f"batch {b}: faster dtype {best['dtype']}")
    if cuda and res["rows"]:
        b1 = min((r for r in res["rows"] if r["batch"] == 1), key=lambda r: r["both"], default=None)
        if b1:
            log(f"target one 512 px reconstruction <= 0.5 s and <= 12 GB: {b1['both']:.3f} s, {b1['peak_gib']:.2f} GiB "
                f"({b1['dtype']})")
    if not cuda:
        log("(CPU, tiny configs: shows the script runs; the figures say nothing about a GPU)")
    if res["skipped"]:
        log(f"skipped (time budget {args.budget_s:.0f} s): {res['skipped']}")
    res["wall_s"] = time.perf_counter() - start
    log(f"wall {res['wall_s']:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
