"""The feature-extraction loop shared by the ``extract`` command and the MiniNSD demo bundle.

:func:`extract_features` streams a subject's images (``Subject.image``) and captions (``Subject.captions``)
batch by batch through the given encoders and appends the results to a feature store
(:class:`~brain_diffuser_core.features.store.FeatureWriter` shards under ``out/<feature>/``). Images already
in the store are skipped, so an interrupted run resumes and a second subject that saw the same images costs
nothing.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from ..config import FEATURE_NAMES, PAPER
from ..seeding import seed_for

__all__ = ["extract_features", "feature_encoders", "image_ids_of"]

#: progress(done_batches, total_batches)
ProgressFn = Callable[[int, int], None]
_SPLITS = ("train", "test")


def image_ids_of(subject, splits: Sequence[str] = _SPLITS) -> np.ndarray:
    """Sorted unique 0-based 73k ids of ``subject``'s images in ``splits`` ("train", "test")."""
    bad = [s for s in splits if s not in _SPLITS]
    if bad or not splits:
        raise ValueError(f"'splits' must be a non-empty subset of {list(_SPLITS)}; {list(splits)} was provided")
    return np.unique(np.concatenate([np.asarray(getattr(subject, f"{s}_image_ids"), np.int64) for s in splits]))


def feature_encoders(names: Sequence[str], *, vdvae=None, clip=None, vdvae_mode: str = "sample") -> dict:
    """name -> (per-image shape, fn(uint8 images (k, S, S, 3), captions (k lists) or None, 73k ids (k,)) ->
    float array (k, *shape)); VDVAE posterior samples seeded per image by ``seed_for("vdvae-encode", id)``.
    Shared by :func:`extract_features` and the batch ``extract`` job, so both compute the same numbers."""
    encoders = {}
    if "vdvae" in names:
        encoders["vdvae"] = ((vdvae.feature_dim(),), lambda imgs, caps, batch_ids: vdvae.encode(
            imgs, mode=vdvae_mode, seed=[seed_for("vdvae-encode", int(i)) for i in batch_ids]).cpu().numpy())
    if "clip_text" in names:
        encoders["clip_text"] = ((clip.text_tokens, clip.dim), lambda imgs, caps, _: clip.text_embeddings_batch(caps))
    if "clip_vision" in names:
        encoders["clip_vision"] = ((clip.vision_tokens, clip.dim), lambda imgs, caps, _: clip.vision_embeddings(imgs))
    return encoders


def extract_features(
    subject,
    out: str | os.PathLike,
    *,
    vdvae=None,
    clip=None,
    feature_names: Sequence[str] = FEATURE_NAMES,
    splits: Sequence[str] = _SPLITS,
    batch_size: int = 16,
    dtype: str = "float16",
    vdvae_mode: str = "sample",
    progress: bool | ProgressFn = False,
) -> dict[str, int]:
    """Compute ``feature_names`` for every image of ``subject`` in ``splits`` and append them to ``out``.

    Parameters
    ----------
    subject : an ``nsd.Subject`` (anything with ``image(id)`` -> uint8 (S, S, 3), ``captions(id)`` -> list of
        str, ``train_image_ids`` / ``test_image_ids``).
    out : feature store folder (read back with :class:`~brain_diffuser_core.features.store.FeatureStore`).
    vdvae : a loaded :class:`~brain_diffuser_core.features.vdvae.VDVAE`; required for ``"vdvae"``. Latents of
        the first ``config.n_feature_layers`` layers, (feature_dim,) per image; posterior samples seeded per
        image by ``seed_for("vdvae-encode", image_id)`` (``vdvae_mode="sample"``) or posterior means.
    clip : a :class:`~brain_diffuser_core.features.clip.ClipFeatureExtractor`; required for ``"clip_text"``
        (77, D), averaged over the image's captions (an image without captions is encoded as "") and
        ``"clip_vision"`` (257, D).
    batch_size : images per batch.
    dtype : stored feature dtype, "float16" or "float32".
    progress : True for a tqdm bar, or a callable ``progress(done_batches, total_batches)``.

    Returns
    -------
    dict : feature name -> number of the subject's images now in the store.
    """
    from .store import FeatureWriter

    # 1. Check inputs
    names = list(feature_names)
    bad = [n for n in names if n not in FEATURE_NAMES]
    if bad or not names:
        raise ValueError(f"'feature_names' must be a non-empty subset of {list(FEATURE_NAMES)}; {names} was provided")
    if "vdvae" in names and vdvae is None:
        raise ValueError("'vdvae' (a loaded VDVAE) is required to extract vdvae features: pass the model "
                         f"(the paper's is {PAPER.stage1.checkpoint_name}) or leave vdvae out of 'feature_names'")
    if {"clip_text", "clip_vision"} & set(names) and clip is None:
        raise ValueError("'clip' (a ClipFeatureExtractor) is required to extract clip_text/clip_vision features; "
                         "None was provided")
    if int(batch_size) < 1:
        raise ValueError(f"'batch_size' must be >= 1; {batch_size!r} was provided")
    if vdvae_mode not in ("sample", "mean"):
        raise ValueError(f"'vdvae_mode' must be one of ['sample', 'mean']; {vdvae_mode!r} was provided")
    ids = image_ids_of(subject, splits)

    # 2. Encoders: name -> (per-image shape, fn(images, captions, ids) -> array)
    encoders = feature_encoders(names, vdvae=vdvae, clip=clip, vdvae_mode=vdvae_mode)

    # 3. What is still to do
    writers = {n: FeatureWriter(out, n, encoders[n][0], dtype=dtype) for n in names}
    todo = {n: np.setdiff1d(ids, w.done_ids()) for n, w in writers.items()}
    pending = np.unique(np.concatenate(list(todo.values())))
    starts = list(range(0, len(pending), int(batch_size)))

    # 4. Stream batches
    bar = None
    if progress is True and starts:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="extract", unit="batch")
    try:
        for k, start in enumerate(starts):
            batch_ids = pending[start:start + int(batch_size)]
            images = np.stack([subject.image(int(i)) for i in batch_ids])
            captions = ([subject.captions(int(i)) or [""] for i in batch_ids] if "clip_text" in names else None)
            for name, writer in writers.items():
                keep = np.isin(batch_ids, todo[name])
                if not keep.any():
                    continue
                caps = None if captions is None else [c for c, kk in zip(captions, keep) if kk]
                feats = encoders[name][1](images[keep], caps, batch_ids[keep])
                writer.append(batch_ids[keep], np.asarray(feats).reshape((int(keep.sum()),) + writer.shape))
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(k + 1, len(starts))
    finally:
        if bar is not None:
            bar.close()
    return {n: int(np.isin(ids, w.done_ids()).sum()) for n, w in writers.items()}
