"""The ``evaluate`` job: the reconstructions of every variant for subjects' test rows, on the batch layer.

Items are (subject, test row), subject by subject; an item makes its row's image of every variant (seed
``seed_for("trial", <73k id>, base_seed=...)``, as :func:`~brain_diffuser_core.evaluation.reconstruct_variants`).
No shard spans two subjects, and a worker generates a shard's rows in batches of ``batch_size`` per variant: with
a shard size that is a multiple of the batch size (the default: 8 and 4) the batches, and so the images, are
those of :func:`~brain_diffuser_core.evaluation.evaluate_bundle`. The driver scores every image afterwards
(2-way identification needs the whole set): metrics.json, metrics.csv, per_image.csv, table.md as before.
Output (``<sub>`` is ``subjNN/`` with several subjects, else empty)::

    <sub>images/<variant>/<73k id>.png
    batch.json, shards/, index.json, index.csv
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .plan import GroupedJob, Item
from .store import ItemOutput

__all__ = ["EvaluateJob", "subject_prefix"]


def subject_prefix(subject: int, n_subjects: int) -> str:
    """The folder of a subject's evaluation inside the output folder: "" alone, "subjNN/" with others."""
    return "" if n_subjects == 1 else f"subj{int(subject):02d}/"


@dataclass
class EvaluateJob(GroupedJob):
    """rows / image_ids : subject -> test rows and their 73k ids (row-aligned); rescale and overrides resolved
    (:func:`~brain_diffuser_core.evaluation.resolve_settings`)."""

    bundle: str
    bundle_digest: str
    nsd_root: str
    rows: dict[int, list[int]]
    image_ids: dict[int, list[int]]
    variants: list[str]
    base_seed: int = 0
    rescale: str = "train"
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: bool = False
    device: str = "auto"
    batch_size: int = 4
    threads: int | None = None
    cache_dir: str | None = None
    kind: str = "evaluate"

    def settings(self) -> dict:
        """What decides the images (the networks and pixel size only score them, again on every run)."""
        return {"bundle": self.bundle_digest, "nsd_root": self.nsd_root,
                "rows": [[int(s), [int(r) for r in rows]] for s, rows in self.rows.items()],
                "variants": list(self.variants), "seed": self.base_seed, "rescale": self.rescale,
                "overrides": dict(sorted(self.overrides.items())), "paper": self.paper, "device": self.device,
                "batch_size": self.batch_size}

    def groups(self) -> list[list[Item]]:
        return [[Item(f"{s}/{i}", {"subject": int(s), "row": int(r), "image_id": int(i)})
                 for r, i in zip(rows, self.image_ids[s])] for s, rows in self.rows.items()]

    def open_worker(self) -> "_EvaluateWorker":
        return _EvaluateWorker(self)

    def paths(self, out: str | Path, subject: int) -> dict[str, list[Path]]:
        """{variant: PNG path per row} of ``subject`` (what :func:`score_variants` reads)."""
        from ..evaluation import image_relpath

        base = Path(out) / subject_prefix(subject, len(self.rows))
        return {v: [base / image_relpath(v, i) for i in self.image_ids[subject]] for v in self.variants}


class _EvaluateWorker:
    """One BrainDiffuser and the job's subjects for the life of a process or Ray actor."""

    def __init__(self, job: EvaluateJob):
        from ._worker import load_subjects, open_diffuser

        self.job = job
        self.diffuser = open_diffuser(job.bundle, threads=job.threads, device=job.device, paper=job.paper)
        self.subjects = load_subjects(job.nsd_root, job.rows, job.cache_dir)
        self._paper_feats: dict[int, Any] = {}

    def _feats_all(self, subject: int):
        from ..evaluation import paper_features

        if subject not in self._paper_feats:  # "paper" rescaling z-scores over the whole test set, once
            self._paper_feats[subject] = paper_features(self.diffuser, self.subjects[subject], self.job.rescale)
        return self._paper_feats[subject]

    def run(self, items: Sequence[Item]) -> list[ItemOutput]:
        from ..evaluation import image_relpath, variant_images
        from ..export import png_bytes
        from ..seeding import seed_for

        job, out = self.job, []
        groups: list[list[Item]] = []  # (one subject per batch when the plan is EvaluateJob.shards)
        for it in items:
            if groups and groups[-1][0].params["subject"] == it.params["subject"]:
                groups[-1].append(it)
            else:
                groups.append([it])
        for group in groups:
            s = int(group[0].params["subject"])
            rows = [int(it.params["row"]) for it in group]
            files: list[dict[str, bytes]] = [{} for _ in group]
            for variant in job.variants:
                images = variant_images(self.diffuser, self.subjects[s], variant, rows, base_seed=job.base_seed,
                                        rescale=job.rescale, overrides=job.overrides, feats_all=self._feats_all(s))
                for f, it, image in zip(files, group, images):
                    rel = subject_prefix(s, len(job.rows)) + image_relpath(variant, it.params["image_id"])
                    f[rel] = png_bytes(image)
            for f, it in zip(files, group):
                out.append(ItemOutput(it.key, f, {"seed": seed_for("trial", int(it.params["image_id"]),
                                                                   base_seed=job.base_seed)}))
        return out
