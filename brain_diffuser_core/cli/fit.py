"""``fit``: fit the ridge decoders fMRI -> features for one subject and write (or update) a decoder bundle.

Example::

    python -m brain_diffuser_core fit --nsd-root /data/nsd --subject 1 --features feats/ --out bundle/
    python -m brain_diffuser_core fit ... --subject 1,2,5,7 --engine ray --ray-address auto

The subject's train fMRI (``nsd.load_subject``) is regressed onto the train images' features read from the
feature store (``features.store.FeatureStore``), one factorisation of the fMRI kernel serving the three
decoders, with the paper's alphas unless overridden. Adding a subject to an existing bundle keeps the other
subjects; refitting some features of a subject keeps its other decoders when the voxel mask is unchanged.

On the batch layer (one item per subject): each subject's decoders are committed to the work folder
(``--work``) as they finish, so an interrupted multi-subject fit resumes with the missing subjects (other
settings into an unfinished work folder are refused); the bundle is written when every subject is done.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..config import FEATURE_NAMES, PAPER
from ._engine import ENGINE_HELP, add_engine_arguments

__all__ = ["add_parser", "fit_decoders", "fit_subject_bundle", "parse_feature_list", "parse_subjects"]


def parse_feature_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in FEATURE_NAMES]
    if not names or bad:
        raise ValueError(f"'--features-to' must be a comma list of {list(FEATURE_NAMES)}; {text!r} was provided")
    return names


@dataclass
class _Source:
    """Column batches of one feature's train targets, and the mean Euclidean norm of its rows."""

    n_targets: int
    get: Callable[[int, int], np.ndarray]


def _sources_from_arrays(features: Mapping[str, np.ndarray], n: int) -> dict[str, tuple[tuple[int, ...], _Source]]:
    out = {}
    for name, arr in features.items():
        a = np.asarray(arr) if not hasattr(arr, "shape") else arr
        if a.shape[0] != n:
            raise ValueError(f"features {name!r} must have {n} rows (one per train image); shape {a.shape} was provided")
        flat = a.reshape(n, -1)
        out[name] = (tuple(a.shape[1:]), _Source(flat.shape[1], lambda s, e, f=flat: f[:, s:e]))
    return out


def fit_decoders(
    train_fmri: np.ndarray,
    features: Mapping[str, Any],
    *,
    alphas: Mapping[str, float] | None = None,
    rank: int | None = None,
    dtype: str = "float16",
    backend: str = "auto",
    loo_stats: bool | int = True,
    n_targets_batch: int = 4096,
    progress: bool = False,
    factorisation=None,
    form: str = "auto",
) -> tuple[dict, dict[str, float], dict[str, tuple[int, ...]]]:
    """Fit one ridge decoder per feature from ``train_fmri`` (n, n_voxels) sharing one factorisation.

    ``features``: name -> array (n, *shape) row-aligned with ``train_fmri``, or name -> ``(shape, source)``
    pairs as built by :func:`fit_subject_bundle` for streamed store reads. Alphas default to
    ``PAPER.ridge_alpha(name)``. Returns ``(decoders, train_feature_norms, shapes)``: the mean Euclidean
    norm of a training sample's feature vector per feature, and each feature's per-image shape.

    Without ``factorisation`` X is factorised by the fixed-alpha kernel path (``method="kernel"``; "eigh" when
    ``rank`` is set). ``factorisation``: a :class:`~brain_diffuser_core.ridge.RidgeFactorisation` of this
    ``train_fmri`` (as ``factorise(train_fmri, backend=backend)`` returns it, e.g. the one an alpha search already
    made) to reuse instead of factorising again; the decoders are then the same. Features sharing an alpha share
    its projector. ``form``: how full weights are stored (:func:`~brain_diffuser_core.ridge.fit_ridge`; "auto":
    the dual form when there are fewer train images than voxels, as in NSD).
    """
    from ..ridge import factorise

    X = np.asarray(train_fmri, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"'train_fmri' must be 2-D (n_images, n_voxels); shape {X.shape} was provided")
    n = X.shape[0]
    sources = {}
    for name, val in features.items():
        if isinstance(val, tuple) and len(val) == 2 and isinstance(val[1], _Source):
            sources[name] = val
        else:
            sources.update(_sources_from_arrays({name: val}, n))
    alphas = {name: float((alphas or {}).get(name) or PAPER.ridge_alpha(name)) for name in sources}
    if factorisation is None:
        # the alphas are fixed here: the kernel path (Cholesky per alpha) does what the eigendecomposition
        # would, cheaper; low rank needs the eigenvectors
        fact = factorise(X, backend=backend, method="kernel" if rank is None else "eigh")
    else:
        fact = factorisation
        if (fact.n_samples, fact.n_features) != X.shape:
            raise ValueError(f"'factorisation' is of a ({fact.n_samples}, {fact.n_features}) X; 'train_fmri' has "
                             f"shape {X.shape}")
    # the projector of an alpha is O(p n^2): build it once when several features use that alpha
    with fact.reusing_operators() if len(set(alphas.values())) < len(alphas) else contextlib.nullcontext():
        return _fit_sources(fact, sources, alphas, n, rank, dtype, loo_stats, n_targets_batch, progress, form)


def _fit_sources(fact, sources: dict, alphas: dict, n: int, rank, dtype, loo_stats, n_targets_batch, progress,
                 form="auto"):
    from ..ridge import fit_ridge
    from ..seeding import seed_for
    from ..target_axes import principal_axes

    decoders, norms, shapes = {}, {}, {}
    for name, (shape, src) in sources.items():
        sq = np.zeros(n, dtype=np.float64)
        seen = np.zeros(src.n_targets, dtype=bool)

        def Y(start, stop, _src=src, _sq=sq, _seen=seen):
            block = np.asarray(_src.get(start, stop), dtype=np.float32)
            if not _seen[start:stop].any():  # first pass: accumulate row norms
                # float32 row sums of one batch (8,859 x 4,096: 9 ms, 8e-7 relative) into float64 totals; the
                # float64 copy squared took 98 ms a batch, ~8 s of a full subject's fit
                _sq += np.einsum("ij,ij->i", block, block)
                _seen[start:stop] = True
            return block

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=src.n_targets * (2 if rank else 1), desc=f"fit {name}", unit="col", file=sys.stderr)

        def report(done, total, _bar=bar):
            if _bar is not None:
                _bar.update(done - _bar.n)

        try:
            decoders[name] = fit_ridge(fact, Y, alphas[name], n_targets=src.n_targets, rank=rank, dtype=dtype,
                                       loo_stats=loo_stats, n_targets_batch=n_targets_batch, progress=report,
                                       form=form)
            # how far training features spread along any direction (the ROI-optimal features' scale)
            decoders[name].add_target_axes(*principal_axes(
                Y, n, src.n_targets, decoders[name].tensors["y_mean"].numpy(), n_targets_batch=n_targets_batch,
                seed=seed_for("target-axes", name)))
        finally:
            if bar is not None:
                bar.close()
        norms[name] = float(np.sqrt(sq).mean())
        shapes[name] = shape
    return decoders, norms, shapes


def _store_sources(store, names: list[str], ids: np.ndarray) -> dict:
    out = {}
    for name in names:
        if name not in store.names():
            raise ValueError(f"feature {name!r} is not in the feature store {store.folder}; it holds {store.names()}")
        have = store.ids(name)
        missing = np.setdiff1d(ids, have)
        if len(missing):
            raise ValueError(
                f"feature {name!r} in {store.folder} lacks {len(missing)} of the subject's {len(ids)} train images, "
                f"e.g. 73k ids {missing[:10].tolist()}; run the feature extraction for them first"
            )
        shape = store.shape(name)
        out[name] = (shape, _Source(int(np.prod(shape)),
                                    lambda s, e, _n=name: store.get(_n, ids, columns=slice(s, e))))
    return out


def fit_subject_bundle(
    subject_obj,
    store,
    out: str | Path,
    *,
    feature_names: tuple[str, ...] | list[str] = FEATURE_NAMES,
    alphas: Mapping[str, float] | None = None,
    rank: int | None = None,
    dtype: str = "float16",
    models: Mapping[str, Mapping[str, str]] | None = None,
    backend: str = "auto",
    loo_stats: bool | int = True,
    n_targets_batch: int = 4096,
    progress: bool = False,
    factorisation=None,
    form: str = "auto",
) -> Path:
    """Fit ``feature_names`` for a loaded subject (an ``nsd.Subject`` or anything with ``subject``,
    ``train_fmri``, ``train_image_ids``, ``n_voxels``, ``mask_sha256``) from a FeatureStore; write or update
    the bundle at ``out``. Returns the bundle path. ``factorisation``: see :func:`fit_decoders`."""
    from ..bundle import SubjectDecoders, load_bundle, save_bundle

    subj = int(subject_obj.subject)
    ids = np.asarray(subject_obj.train_image_ids, dtype=np.int64)
    sources = _store_sources(store, feature_names, ids)
    decoders, norms, shapes = fit_decoders(
        subject_obj.train_fmri, sources, alphas=alphas, rank=rank, dtype=dtype, backend=backend,
        loo_stats=loo_stats, n_targets_batch=n_targets_batch, progress=progress, factorisation=factorisation,
        form=form,
    )
    out = Path(out)
    if (out / "manifest.json").exists():  # save_bundle(update=True) keeps the subject's other decoders
        old = load_bundle(out)
        if subj in old.subjects:
            info = old.subject_info(subj)
            if (info["n_voxels"], info["mask_sha256"]) != (int(subject_obj.n_voxels), str(subject_obj.mask_sha256)):
                dropped = sorted(set(info["decoders"]) - set(decoders))
                if dropped:
                    print(f"note: dropping subject {subj}'s old decoders {dropped}: its voxel mask differs",
                          file=sys.stderr)
    entry = SubjectDecoders(
        n_voxels=int(subject_obj.n_voxels), mask_sha256=str(subject_obj.mask_sha256), decoders=decoders,
        train_feature_norm={k: v for k, v in norms.items() if v is not None},
        info={"n_train": int(len(ids))},
    )
    return save_bundle(out, {subj: entry}, feature_shapes=shapes, models=models, update=True)


def parse_subjects(text: str) -> list[int]:
    """'1' or '1,2,5,7' -> [1, 2, 5, 7] (NSD subjects 1..8, each once)."""
    try:
        subjects = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        subjects = []
    if not subjects or any(not 1 <= s <= 8 for s in subjects):
        raise ValueError(f"'--subject' must be a subject 1..8 or a comma list of them; {text!r} was provided")
    return list(dict.fromkeys(subjects))


def _run(args: argparse.Namespace) -> int:
    import shutil

    from ..batch import BatchSettingsError
    from ..batch.fit import FitJob, assemble_bundle, store_stamp
    from ..features.store import FeatureStore
    from ..nsd import load_subject
    from ._engine import run_batch, worker_threads

    names = parse_feature_list(args.features_to)
    subjects = parse_subjects(args.subject)
    alphas = {"vdvae": args.alpha_vdvae, "clip_text": args.alpha_clip_text, "clip_vision": args.alpha_clip_vision}
    alphas = {n: float(alphas.get(n) or PAPER.ridge_alpha(n)) for n in names}
    models = None
    if args.models_json:
        path = Path(args.models_json)
        if not path.exists():
            raise FileNotFoundError(f"'--models-json' file {path} does not exist")
        models = json.loads(path.read_text())
    work = Path(args.work) if args.work else Path(f"{Path(args.out)}.fit-work")
    loo: bool | int = True if args.loo_rows is None else (False if args.loo_rows == 0 else args.loo_rows)

    def make_job() -> FitJob:
        store = FeatureStore(args.features)
        masks = {}
        for s in subjects:  # every subject's features are checked before anything is written
            subject = load_subject(args.nsd_root, s, cache_dir=args.cache_dir)
            _store_sources(store, names, np.asarray(subject.train_image_ids, dtype=np.int64))
            masks[s] = str(subject.mask_sha256)
            del subject
        return FitJob(nsd_root=str(Path(args.nsd_root).resolve()), features=str(Path(args.features).resolve()),
                      subjects=subjects, names=names, alphas=alphas, masks=masks, rank=args.rank, dtype=args.dtype,
                      form=args.form,
                      backend=args.backend, loo_stats=loo, n_targets_batch=args.batch,
                      cache_dir=args.cache_dir and str(Path(args.cache_dir).resolve()),
                      threads=worker_threads(args), progress=args.engine == "local" and not args.no_progress,
                      stamp=store_stamp(args.features, names))

    try:
        _, summary = run_batch(make_job, args, out=work)
    except BatchSettingsError as err:  # the store names --out; fit's batch folder is --work
        raise BatchSettingsError(str(err).replace("or choose another --out folder",
                                                  "or pass another --work folder (or remove this one)")) from None
    if len(summary.rows) < summary.n_items:  # --part: other parts still have subjects to fit
        print(f"{summary.n_items - len(summary.rows)} subject(s) still to fit (other --part ranges); the bundle "
              f"is written by the run that finds every shard done")
        return 0
    out = assemble_bundle(work, summary.rows, args.out, models=models)
    if args.part is None and not args.keep_work:
        shutil.rmtree(work)  # every decoder is in the bundle now; a later fit with other settings starts afresh
    print(f"wrote decoders for subject(s) {', '.join(map(str, subjects))} ({', '.join(names)}) to {out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fit", help="fit ridge decoders fMRI -> features and write a decoder bundle",
        description=__doc__ + "\n" + ENGINE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nsd-root", required=True, help="NSD root folder")
    p.add_argument("--subject", required=True,
                   help="NSD subject, or a comma list (the paper uses 1,2,5,7): one batch item each")
    p.add_argument("--features", required=True, help="feature store folder (vdvae, clip_text, clip_vision by 73k id)")
    p.add_argument("--out", required=True, help="bundle folder to write or update")
    p.add_argument("--features-to", default=",".join(FEATURE_NAMES), help="comma list of features to fit")
    p.add_argument("--alpha-vdvae", type=float, default=None, help=f"default {PAPER.ridge_alpha('vdvae'):g}")
    p.add_argument("--alpha-clip-text", type=float, default=None, help=f"default {PAPER.ridge_alpha('clip_text'):g}")
    p.add_argument("--alpha-clip-vision", type=float, default=None,
                   help=f"default {PAPER.ridge_alpha('clip_vision'):g}")
    p.add_argument("--rank", type=int, default=None, help="store weights as rank-R factors (default: full)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored weight dtype")
    p.add_argument("--form", choices=["auto", "primal", "dual"], default="auto",
                   help="full weights as W (primal: p x targets) or as the dual factors (n x p, n x targets; "
                        "far less arithmetic and a smaller bundle when n < p); default auto: dual when n < p")
    p.add_argument("--loo-rows", type=int, default=None,
                   help="estimate leave-one-out rescaling statistics on this many train rows (default all; 0 = none)")
    p.add_argument("--batch", type=int, default=4096, help="target columns per batch (memory)")
    p.add_argument("--backend", choices=["auto", "numpy", "torch", "torch_cuda"], default="auto")
    p.add_argument("--cache-dir", default=None, help="prepared-subject cache folder (see 'prepare')")
    p.add_argument("--models-json", default=None,
                   help='JSON file of model references, e.g. {"vdvae": {"path": "..."}, "clip": {"hf_id": "..."}}')
    p.add_argument("--work", default=None, metavar="DIR",
                   help="batch work folder: each subject's decoders as they finish (default: <out>.fit-work; "
                        "removed once the bundle is written, unless --keep-work or --part)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder after writing the bundle")
    add_engine_arguments(p, shard_size=1)
    p.set_defaults(func=_run)
    return p
