"""The ``extract`` job: VDVAE and CLIP features of a subject's images, one feature-store shard per batch shard.

Items are 73k image ids (sorted); batch shard k writes ``<feature>/shard-<k>.safetensors`` (tensors
``image_ids`` int64 (n,), ``features`` float16/32 (n, *shape)) and ``<feature>/meta.json``: the shard-folder
layout :class:`~brain_diffuser_core.features.store.FeatureStore` reads (and ``fit --features`` uses). The
numbers come from :func:`~brain_diffuser_core.features.extract.feature_encoders`, as the single-process
:func:`~brain_diffuser_core.features.extract.extract_features` computes them (VDVAE samples seeded per image).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .plan import Item, Shard
from .store import MANIFEST_NAME, ItemOutput

__all__ = ["ExtractJob", "build_extract_job"]


def _file_stamp(ref: str | None) -> dict | None:
    """Identify a weights file or folder cheaply (path, size, mtime): hashing gigabytes on every run is slow."""
    if not ref:
        return None
    p = Path(ref)
    if not p.exists():
        return {"ref": ref}  # a Hugging Face id, resolved in the local cache by the workers
    st = p.stat()
    return {"path": str(p.resolve()), "bytes": st.st_size if p.is_file() else None, "mtime": int(st.st_mtime)}


@dataclass
class ExtractJob:
    nsd_root: str
    subject: int
    image_ids: list[int]
    names: list[str]
    vdvae: str | None
    clip: str | None
    vdvae_mode: str = "sample"
    dtype: str = "float16"
    device: str = "auto"
    batch_size: int = 16
    threads: int | None = None
    cache_dir: str | None = None
    weights: dict = field(default_factory=dict)
    kind: str = "extract"

    def settings(self) -> dict:
        return {"subject": self.subject, "features": list(self.names), "vdvae_mode": self.vdvae_mode,
                "dtype": self.dtype, "device": self.device, "batch_size": self.batch_size, "weights": self.weights}

    def items(self) -> list[Item]:
        return [Item(str(i), {"image_id": int(i)}) for i in self.image_ids]

    def open_worker(self) -> "_ExtractWorker":
        return _ExtractWorker(self)

    def shard_files(self, shard: Shard, outputs: Sequence[ItemOutput]) -> dict[str, bytes]:
        from safetensors.numpy import save

        ids = np.array([int(o.row["image_id"]) for o in outputs], dtype=np.int64)
        files = {}
        for name in self.names:
            feats = np.stack([np.asarray(o.arrays[name]) for o in outputs]).astype(self.dtype)
            files[f"{name}/shard-{shard.index:05d}.safetensors"] = save({"image_ids": ids, "features": feats})
            files[f"{name}/meta.json"] = json.dumps({"shape": list(feats.shape[1:]), "dtype": self.dtype}).encode()
        return files


class _ExtractWorker:
    def __init__(self, job: ExtractJob):
        from ..features.extract import feature_encoders
        from ..pipeline import resolve_device
        from ._worker import load_subjects, set_threads

        set_threads(job.threads)
        device = resolve_device(job.device)
        self.subject = load_subjects(job.nsd_root, [job.subject], job.cache_dir)[job.subject]
        vdvae = clip = None
        if "vdvae" in job.names:
            from ..features.vdvae import load_vdvae

            vdvae = load_vdvae(job.vdvae, device=device)
        if {"clip_text", "clip_vision"} & set(job.names):
            from ..features.clip import ClipFeatureExtractor

            clip = ClipFeatureExtractor.from_pretrained(job.clip, device=device)
        self.job = job
        self.encoders = feature_encoders(job.names, vdvae=vdvae, clip=clip, vdvae_mode=job.vdvae_mode)

    def run(self, items: Sequence[Item]) -> list[ItemOutput]:
        ids = np.array([int(it.params["image_id"]) for it in items], dtype=np.int64)
        images = np.stack([self.subject.image(int(i)) for i in ids])
        captions = [self.subject.captions(int(i)) or [""] for i in ids] if "clip_text" in self.job.names else None
        feats = {}
        for name in self.job.names:
            shape, fn = self.encoders[name]
            feats[name] = np.asarray(fn(images, captions, ids)).reshape((len(ids),) + tuple(shape))
        return [ItemOutput(it.key, row={"image_id": int(i)}, arrays={n: feats[n][k] for n in self.job.names})
                for k, (it, i) in enumerate(zip(items, ids))]


def build_extract_job(nsd_root: str, subject: int, out: str, names: Sequence[str], splits: Sequence[str], *,
                      vdvae: str | None, clip: str | None, vdvae_mode: str = "sample", dtype: str = "float16",
                      device: str = "auto", batch_size: int = 16, threads: int | None = None,
                      cache_dir: str | None = None) -> ExtractJob:
    """The job for ``subject``'s images in ``splits``; refuses a folder of features written without the batch
    layer (its shard numbers would collide)."""
    from ..features.extract import image_ids_of
    from ..nsd import load_subject

    outp = Path(out)
    if not (outp / MANIFEST_NAME).exists():
        old = [n for n in names if (outp / n).is_dir() and any((outp / n).glob("shard-*.safetensors"))
               or (outp / f"{n}.safetensors").exists() or (outp / f"{n}.npy").exists()]
        if old:
            raise ValueError(f"{out} already holds features {old} written without the batch layer (no "
                             f"{MANIFEST_NAME}); extract into a new --out folder, or move those aside")
    sub = load_subject(nsd_root, subject, cache_dir=cache_dir, progress=True)
    ids = [int(i) for i in image_ids_of(sub, splits)]
    return ExtractJob(nsd_root=str(Path(nsd_root).resolve()), subject=int(subject), image_ids=ids, names=list(names),
                      vdvae=vdvae and (str(Path(vdvae).resolve()) if os.path.exists(vdvae) else vdvae),
                      clip=clip and (str(Path(clip).resolve()) if os.path.exists(clip) else clip),
                      vdvae_mode=vdvae_mode, dtype=dtype, device=str(device), batch_size=int(batch_size),
                      threads=threads, cache_dir=cache_dir and str(Path(cache_dir).resolve()),
                      weights={"vdvae": _file_stamp(vdvae), "clip": _file_stamp(clip)})
