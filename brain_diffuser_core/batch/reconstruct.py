"""The ``reconstruct`` job: a subject's test trials -> original | stage 1 | final PNGs, on the batch layer.

Items are test rows (the subject's test images sorted by 73k id, repeats averaged); an item's seed is
``seed_for("trial", <73k id>, base_seed=...)`` as in :meth:`BrainDiffuser.reconstruct`. Output (unchanged
from the command's earlier, single-process form, plus the batch files)::

    <73k id>_original.png, <73k id>_stage1.png (upscaled, as fed to stage 2), <73k id>_final.png
    manifest.json   {"run": settings, "images": {<73k id>: {"seed", "timings", "files"}}}
    index.csv / index.json, batch.json, shards/
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .plan import Item
from .store import ItemOutput, write_bytes

__all__ = ["ReconstructJob", "write_legacy_manifest"]


@dataclass
class ReconstructJob:
    """rows : test-set rows to reconstruct; image_ids : their 73k ids (row-aligned); rescale : "train",
    "paper" (z-score over the whole test set, computed once per worker) or "none"."""

    bundle: str
    bundle_digest: str
    nsd_root: str
    subject: int
    rows: list[int]
    image_ids: list[int]
    base_seed: int = 0
    rescale: str = "train"
    run_stage2: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    batch_size: int = 1
    threads: int | None = None
    cache_dir: str | None = None
    paper: bool = False
    kind: str = "reconstruct"

    def settings(self) -> dict:
        return {"bundle": self.bundle_digest, "subject": self.subject, "seed": self.base_seed,
                "rescale": self.rescale, "stage1_only": not self.run_stage2,
                "overrides": dict(sorted(self.overrides.items())), "device": self.device,
                "batch_size": self.batch_size, "paper": self.paper}

    def items(self) -> list[Item]:
        return [Item(str(i), {"row": int(r), "image_id": int(i)}) for r, i in zip(self.rows, self.image_ids)]

    def open_worker(self) -> "_ReconstructWorker":
        return _ReconstructWorker(self)


class _ReconstructWorker:
    def __init__(self, job: ReconstructJob):
        from ._worker import load_subjects, open_diffuser

        self.job = job
        self.diffuser = open_diffuser(job.bundle, threads=job.threads, device=job.device, paper=job.paper)
        self.subject = load_subjects(job.nsd_root, [job.subject], job.cache_dir)[job.subject]
        # "paper" rescaling z-scores across the predicted test set: it needs all of it at once
        self.all_features = (self.diffuser.predict_features(self.subject.test_fmri, job.subject, rescale="paper")
                             if job.rescale == "paper" else None)

    def run(self, items: Sequence[Item]) -> list[ItemOutput]:
        from ..export import png_bytes
        from ..seeding import seed_for

        job, s = self.job, self.subject
        rows = [int(it.params["row"]) for it in items]
        ids = [int(it.params["image_id"]) for it in items]
        if self.all_features is None:
            recs = self.diffuser.reconstruct(s.test_fmri[rows], job.subject, image_ids=ids, base_seed=job.base_seed,
                                             rescale=job.rescale, run_stage2=job.run_stage2, **job.overrides)
        else:
            feats = {k: v[rows] for k, v in self.all_features.items()}
            recs = self.diffuser.generate(feats, keys=[f"subj{job.subject:02d}/nsd{i}" for i in ids],
                                          seeds=[seed_for("trial", i, base_seed=job.base_seed) for i in ids],
                                          run_stage2=job.run_stage2, **job.overrides)
        out = []
        for it, image_id, rec in zip(items, ids, recs):
            images = {"original": s.image(image_id), "stage1": rec.stage1_upscaled, "final": rec.final}
            files = {f"{image_id}_{kind}.png": png_bytes(img) for kind, img in images.items() if img is not None}
            out.append(ItemOutput(it.key, files, {"seed": rec.seed, "subject": job.subject,
                                                  "timings": {k: round(v, 4) for k, v in rec.timings.items()}}))
        return out


def write_legacy_manifest(out: str | Path, job: ReconstructJob, rows: Sequence[dict]) -> None:
    """``manifest.json`` as the command wrote it before the batch layer (read by scripts that used it)."""
    import json

    images = {str(r["image_id"]): {"seed": r["seed"], "timings": r["timings"],
                                   "files": [v for k, v in r.items() if k.startswith("file:")]} for r in rows}
    run = {"bundle": job.bundle, "subject": job.subject, "seed": job.base_seed, "rescale": job.rescale,
           "stage1_only": not job.run_stage2, "mode": "paper" if job.paper else "improved", **job.overrides}
    write_bytes(Path(out) / "manifest.json",
                (json.dumps({"run": run, "images": images}, indent=2, sort_keys=True) + "\n").encode())
