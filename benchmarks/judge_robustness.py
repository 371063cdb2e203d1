"""How the independent category judge holds up on fresh world scenes under generic changes of colour and detail.

    python benchmarks/judge_robustness.py [--per-category 30] [--cache-dir DIR] [--threads 2]

Fresh scenes (a seed namespace of their own: neither a world image, a generator scene nor a judge fitting or
held-out scene) are judged as drawn and after each change; printed: the fraction judged right per category and
overall. The changes are generic (none comes from a demo model): a brightness shift, lower contrast, half
saturation, a wash towards white, a yellow cast (the look of the demo's ROI-optimal faces), and the judge's own
fitting degradation (`world.judge.degrade`, drawn from other seeds). Baseline: the crisp scenes, same run.
The judge is fitted once and cached under ``<cache>/judge/`` (about a minute on one core).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def colour_changes(images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 (n, H, W, 3) -> {change name: uint8 (n, H, W, 3)}."""
    x = images.astype(np.float32)
    grey = x.mean(-1, keepdims=True)
    changes = {
        "brightness +40": x + 40.0,
        "contrast x0.6": (x - 127.5) * 0.6 + 127.5 + 30.0,
        "saturation x0.5": grey + 0.5 * (x - grey),
        "washed 45% to white": 0.55 * x + 0.45 * 230.0,
        "yellow cast": x * np.array([1.1, 1.05, 0.8], np.float32),
    }
    return {k: v.clip(0, 255).round().astype(np.uint8) for k, v in changes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-category", type=int, default=30, help="fresh scenes per category (default 30)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from brain_diffuser_core.config import cache_root
    from brain_diffuser_core.world.judge import CategoryJudge, degrade, judge_scenes
    from brain_diffuser_core.world.scenes import CATEGORIES

    judge = CategoryJudge.cached(cache_root() if args.cache_dir is None else args.cache_dir)
    print(f"judge: {judge.describe()}")
    images, labels = judge_scenes(args.per_category, "robustness-probe", seed=0)
    variants = {"as drawn (baseline)": images, **colour_changes(images),
                "judge's fitting degradation": degrade(images, "robustness-probe", seed=0)}
    print(f"{len(images)} fresh scenes; fraction judged right")
    print(f"{'change':30s} " + " ".join(f"{c:>8s}" for c in CATEGORIES) + f" {'all':>8s} {'/ baseline':>10s}")
    base = None
    for name, imgs in variants.items():
        right = judge.classify_index(imgs) == labels
        base = right.mean() if base is None else base
        cells = " ".join(f"{100 * right[labels == k].mean():7.0f}%" for k in range(len(CATEGORIES)))
        print(f"{name:30s} {cells} {100 * right.mean():7.1f}% {right.mean() / base:10.2f}")


if __name__ == "__main__":
    main()
