"""The ``fit`` job: one subject's ridge decoders per item, on the batch layer; the bundle is assembled after.

Items are subjects (one task each: one factorisation of the subject's fMRI kernel serves its decoders);
an item writes each decoder's ``RidgeDecoder.state_dict()`` as safetensors (as the bundle holds it, less the
metadata, which safetensors writes in no fixed order) and its row carries the subject's manifest entry (voxels, mask, train norms, n_train).
Fitting is deterministic, so a shard reruns to identical bytes. When every shard is done the driver
writes (or updates) the bundle from them with :func:`~brain_diffuser_core.bundle.save_bundle`, exactly as
:func:`~brain_diffuser_core.cli.fit.fit_subject_bundle` does. Work folder (``--work``)::

    decoders/subjNN_<feature>.safetensors
    batch.json, shards/, index.json, index.csv
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .plan import Item
from .store import ItemOutput

__all__ = ["FitJob", "store_stamp", "assemble_bundle"]


def store_stamp(folder: str | Path, names: Sequence[str]) -> dict:
    """Identify the feature store's files of ``names`` cheaply: {relative path: [bytes, mtime ns]} (hashing
    gigabytes of features on every run is slow; a rewritten file changes its mtime)."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        head = rel.parts[0]
        if p.is_file() and not head.startswith(".") and (
                head in names or Path(head).stem in names or Path(head).stem.removesuffix("_image_ids") in names):
            st = p.stat()
            out[rel.as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def decoder_relpath(subject: int, feature: str) -> str:
    from ..bundle import decoder_filename

    return f"decoders/{decoder_filename(subject, feature)}"


@dataclass
class FitJob:
    """subjects : NSD subjects (one item each); masks : subject -> mask sha256 (fingerprinted: a re-prepared
    subject with another voxel mask is another job); alphas : feature -> ridge alpha (resolved)."""

    nsd_root: str
    features: str
    subjects: list[int]
    names: list[str]
    alphas: dict[str, float]
    masks: dict[int, str] = field(default_factory=dict)
    rank: int | None = None
    dtype: str = "float16"
    form: str = "auto"
    backend: str = "auto"
    loo_stats: bool | int = True
    n_targets_batch: int = 4096
    cache_dir: str | None = None
    threads: int | None = None
    progress: bool = False
    stamp: dict = field(default_factory=dict)
    batch_size: int = 1
    kind: str = "fit"

    @property
    def device(self) -> str:
        return "cuda" if self.backend == "torch_cuda" else "cpu"

    def settings(self) -> dict:
        return {"nsd_root": self.nsd_root, "features_folder": self.features, "features_files": self.stamp,
                "subjects": list(self.subjects), "masks": {str(s): m for s, m in sorted(self.masks.items())},
                "features": list(self.names), "alphas": dict(sorted(self.alphas.items())), "rank": self.rank,
                "dtype": self.dtype, "form": self.form, "backend": self.backend, "loo_stats": self.loo_stats,
                "n_targets_batch": self.n_targets_batch}

    def items(self) -> list[Item]:
        return [Item(f"subj{int(s):02d}", {"subject": int(s)}) for s in self.subjects]

    def open_worker(self) -> "_FitWorker":
        return _FitWorker(self)


class _FitWorker:
    def __init__(self, job: FitJob):
        from ..features.store import FeatureStore
        from ._worker import set_threads

        set_threads(job.threads)
        self.job = job
        self.store = FeatureStore(job.features)

    def run(self, items: Sequence[Item]) -> list[ItemOutput]:
        from safetensors.torch import save

        from ..cli.fit import _store_sources, fit_decoders
        from ._worker import load_subjects

        job, out = self.job, []
        for it in items:
            s = int(it.params["subject"])
            sub = load_subjects(job.nsd_root, [s], job.cache_dir)[s]
            ids = np.asarray(sub.train_image_ids, dtype=np.int64)
            decoders, norms, shapes = fit_decoders(
                sub.train_fmri, _store_sources(self.store, job.names, ids), alphas=job.alphas, rank=job.rank,
                dtype=job.dtype, backend=job.backend, loo_stats=job.loo_stats, n_targets_batch=job.n_targets_batch,
                progress=job.progress, form=job.form)
            # no safetensors metadata here: it is a hash map, written in no fixed order (save_bundle adds it)
            files = {decoder_relpath(s, f): save(dec.state_dict()) for f, dec in decoders.items()}
            out.append(ItemOutput(it.key, files, {
                "n_voxels": int(sub.n_voxels), "mask_sha256": str(sub.mask_sha256), "n_train": int(len(ids)),
                "train_feature_norm": {k: v for k, v in norms.items() if v is not None},
                "shapes": {k: list(v) for k, v in shapes.items()}}))
            del sub, decoders
        return out


def assemble_bundle(work: str | Path, rows: Sequence[Mapping[str, Any]], out: str | Path,
                    models: Mapping | None = None) -> Path:
    """Write (or update) the bundle ``out`` from a finished fit's index ``rows`` (decoders read from ``work``),
    as :func:`~brain_diffuser_core.cli.fit.fit_subject_bundle` would for each subject."""
    from safetensors.torch import load_file

    from ..bundle import SubjectDecoders, load_bundle, save_bundle
    from ..ridge import RidgeDecoder

    out, work = Path(out), Path(work)
    entries, shapes = {}, {}
    old = load_bundle(out) if (out / "manifest.json").exists() else None
    for r in rows:
        s = int(r["subject"])
        decoders = {f: RidgeDecoder.from_state_dict(load_file(str(work / decoder_relpath(s, f))))
                    for f in r["shapes"]}
        if old is not None and s in old.subjects:  # save_bundle(update=True) keeps the subject's other decoders
            info = old.subject_info(s)
            if (info["n_voxels"], info["mask_sha256"]) != (int(r["n_voxels"]), str(r["mask_sha256"])):
                dropped = sorted(set(info["decoders"]) - set(decoders))
                if dropped:
                    print(f"note: dropping subject {s}'s old decoders {dropped}: its voxel mask differs",
                          file=sys.stderr)
        entries[s] = SubjectDecoders(n_voxels=int(r["n_voxels"]), mask_sha256=str(r["mask_sha256"]),
                                     decoders=decoders, train_feature_norm=dict(r["train_feature_norm"]),
                                     info={"n_train": int(r["n_train"])})
        shapes.update({f: tuple(v) for f, v in r["shapes"].items()})
    return save_bundle(out, entries, feature_shapes=shapes, models=models, update=True)
