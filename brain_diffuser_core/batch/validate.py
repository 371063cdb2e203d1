"""The ``world validate`` job: the ROI-optimal scenes of a validation, generated on the batch layer.

Items are (roi, subject label, k) for k < n_seeds, in the report's order; item k's seed is the plan's
``seed_for("pattern", "validate/<roi>/<label>", k, base_seed=...)`` (:func:`~brain_diffuser_core.world.
validate.plan_validation`), so every scene reproduces alone. No shard spans two (roi, subject)s, and a worker
generates a shard's seeds in batches of ``batch_size``: with a shard size that is a multiple of the batch size
(the default: both 16) the batches, and so the images, are those of :func:`~brain_diffuser_core.world.
validate.validate_bundle`. The driver fits the judges before and scores every image after (report.json,
per_seed.csv, summary.csv, sheets/ as before). Output, beside the report::

    images/<roi>/<label>/<k>_scored.png   the scored image (final; the upscaled stage 1 with --stage1-only)
    batch.json, shards/, index.json, index.csv
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .plan import GroupedJob, Item, consecutive_groups
from .store import ItemOutput

__all__ = ["ValidateJob", "validation_images"]


def _safe(name: str) -> str:
    return name.replace("+", "plus").replace("/", "_")


@dataclass
class ValidateJob(GroupedJob):
    """plan : the :class:`~brain_diffuser_core.world.validate.ValidationPlan` (patterns and seeds, computed on
    the driver and shipped to the workers); overrides : stage settings (``num_inference_steps``)."""

    bundle: str
    bundle_digest: str
    plan: Any
    run_stage2: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    batch_size: int = 16
    threads: int | None = None
    kind: str = "world-validate"

    def settings(self) -> dict:
        """What decides the images (the judges only score them, again on every run: not fingerprinted)."""
        digest = hashlib.sha256()
        for key in self.plan.keys():
            for s, p in self.plan.patterns[key].items():
                digest.update(f"{key}|{s}|".encode() + np.ascontiguousarray(p, np.float32).tobytes())
        return {"bundle": self.bundle_digest, "world": str(Path(self.plan.world_root).resolve()),
                "rois": list(self.plan.rois), "subjects": list(self.plan.labels), "n_seeds": self.plan.n_seeds,
                "base_seed": self.plan.base_seed, "patterns_sha256": digest.hexdigest(),
                "run_stage2": self.run_stage2, "overrides": dict(sorted(self.overrides.items())),
                "device": self.device, "batch_size": self.batch_size}

    def groups(self) -> list[list[Item]]:
        return [[Item(f"{roi}/{label}/{k:03d}", {"roi": roi, "subject": label, "k": k, "seed": int(seed)})
                 for k, seed in enumerate(self.plan.seeds[(roi, label)])] for roi, label in self.plan.keys()]

    def open_worker(self) -> "_ValidateWorker":
        return _ValidateWorker(self)


class _ValidateWorker:
    """Holds one BrainDiffuser (decoders + generative models) for the life of a process or Ray actor."""

    def __init__(self, job: ValidateJob):
        from ._worker import open_diffuser

        self.job = job
        self.diffuser = open_diffuser(job.bundle, threads=job.threads, device=job.device)

    def run(self, items: Sequence[Item]) -> list[ItemOutput]:
        from ..export import png_bytes
        from ..world.validate import generate_validation_images

        job, out = self.job, []
        # a batch never spans two (roi, subject)s: see ValidateJob.shards
        groups = consecutive_groups(items, "roi", "subject")
        for group in groups:
            roi, label = group[0].params["roi"], group[0].params["subject"]
            images = generate_validation_images(self.diffuser, job.plan, roi, label,
                                                [it.params["seed"] for it in group], run_stage2=job.run_stage2,
                                                **job.overrides)
            for it, image in zip(group, images):
                rel = f"images/{_safe(roi)}/{label}/{int(it.params['k']):03d}_scored.png"
                out.append(ItemOutput(it.key, {rel: png_bytes(image)}, {"seed": int(it.params["seed"])}))
        return out


def validation_images(out: str | Path, rows: Sequence[dict]) -> dict[tuple[str, str], list[np.ndarray]]:
    """The finished images read back: (roi, label) -> uint8 (H, W, 3) per seed, in k order (from the index
    rows of a complete run)."""
    from PIL import Image

    images: dict[tuple[str, str], list] = {}
    for r in sorted(rows, key=lambda r: int(r["k"])):
        with Image.open(Path(out) / r["file:scored"]) as im:
            images.setdefault((r["roi"], r["subject"]), []).append(np.asarray(im.convert("RGB")))
    return images
