"""The MiniNSD demo bundle: decoders for every world subject, fitted on features of the demo models.

:func:`ensure_demo_bundle` is what the app calls on first run. It

1. makes sure the MiniNSD world exists (:func:`~brain_diffuser_core.world.build.ensure_world`);
2. takes the demo models from ``assets/demo/models/`` (``vdvae.safetensors`` + ``vdvae.json`` and a
   Versatile Diffusion folder ``versatile-diffusion/`` with the CLIP towers inside, as written by
   ``python -m brain_diffuser_core world train``, see :mod:`brain_diffuser_core.world.train`). When they are
   absent it falls back to untrained tiny random models of the same architectures (written once into the
   cache), logs "demo models not trained yet: run `python -m brain_diffuser_core world train`" and flags it in
   the bundle manifest's ``models`` section (a reference named :data:`UNTRAINED_KEY` instead of
   :data:`TRAINED_KEY`) and in ``demo.json``;
3. extracts the world images' features with those models through the ``extract`` loop
   (:func:`~brain_diffuser_core.features.extract.extract_features`);
4. fits the decoders of every world subject through the ``fit`` path
   (:func:`~brain_diffuser_core.cli.fit.fit_subject_bundle`), one ridge alpha per feature chosen by exact
   leave-one-out on the first subject (the paper too uses one alpha per feature for all subjects; its alphas
   suit 8,859 images x 15,724 voxels, not the world's sizes);
5. writes the bundle atomically to ``<cache>/demo-bundle`` with a stamp (``demo.json``): the bundle is rebuilt
   when the world's files, the models' checksums, the subjects or :data:`DEMO_FORMAT_VERSION` change.

With the untrained tiny models the whole build takes about 50 s after the world (about 12 s) on this project's
2-core machines with one torch thread (``benchmarks/demo_latency.py --threads 1``). On a machine whose cores are
already busy, two torch threads are several times slower than one (oversubscription): set
``torch.set_num_threads(1)`` there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import FEATURE_NAMES, cache_root
from ..io import atomic_dir, atomic_write_json, sha256_file

__all__ = [
    "DEMO_FORMAT_VERSION",
    "DEFAULT_MODELS_DIR",
    "TRAINED_KEY",
    "UNTRAINED_KEY",
    "NOT_TRAINED_MESSAGE",
    "demo_models_present",
    "models_digest",
    "ensure_untrained_models",
    "ensure_demo_bundle",
    "read_demo_stamp",
]

log = logging.getLogger(__name__)

#: bump when the bundle's recipe changes (alpha grid, extraction settings, ...): cached bundles are rebuilt
DEMO_FORMAT_VERSION = 1
#: the trained demo models shipped with the repository
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo" / "models"
VDVAE_FILE = "vdvae.safetensors"
VD_FOLDER = "versatile-diffusion"
#: name of the models-section reference that says which demo models the decoders were fitted for
TRAINED_KEY = "demo_models"
UNTRAINED_KEY = "untrained_random_demo_models"
NOT_TRAINED_MESSAGE = "demo models not trained yet: run `python -m brain_diffuser_core world train`"
STAMP_FILE = "demo.json"
#: ridge alphas tried per feature (exact leave-one-out on the first subject)
ALPHA_GRID: tuple[float, ...] = (1e2, 1e3, 1e4, 1e5, 1e6, 1e7)
#: target columns sampled to score the alphas, and train rows for the leave-one-out rescaling statistics
_ALPHA_COLUMNS = 256
_LOO_ROWS = 512

ProgressFn = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------- models
def demo_models_present(models_dir: str | Path) -> bool:
    """True when ``models_dir`` holds ``vdvae.safetensors`` and ``versatile-diffusion/model_index.json``."""
    d = Path(models_dir)
    return (d / VDVAE_FILE).is_file() and (d / VD_FOLDER / "model_index.json").is_file()


def models_digest(models_dir: str | Path) -> str:
    """sha256 over the relative paths and sha256 of every model file (VDVAE files and the VD folder)."""
    d = Path(models_dir)
    files = [d / VDVAE_FILE, d / "vdvae.json"] + sorted(p for p in (d / VD_FOLDER).rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f"{f.relative_to(d).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def ensure_untrained_models(folder: str | Path, seed: int = 0) -> Path:
    """Write (once) untrained tiny random demo models in the demo layout: a tiny VDVAE at the world's 64 px
    (:meth:`VDVAEConfig.tiny`) and a tiny Versatile Diffusion (:func:`make_tiny_vd`). Returns the folder."""
    import torch

    from ..features.vdvae import VDVAE, VDVAEConfig, save_vdvae
    from ..tiny_models import make_tiny_vd
    from .scenes import IMAGE_SIZE

    folder = Path(folder)
    if not (folder / VD_FOLDER / "model_index.json").is_file():
        make_tiny_vd(folder / VD_FOLDER, seed=seed)
    if not (folder / VDVAE_FILE).is_file():
        torch.manual_seed(seed)
        save_vdvae(VDVAE(VDVAEConfig.tiny(IMAGE_SIZE)).eval(), folder / VDVAE_FILE)
    return folder


# ---------------------------------------------------------------------------------------------- stamp
def _world_digest(world_root: Path) -> tuple[str, dict]:
    from .build import read_world_info

    info = read_world_info(world_root)
    text = json.dumps({"version": info.version, "params": info.params,
                       "files": {k: v["sha256"] for k, v in info.files.items()}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), info.params


def read_demo_stamp(bundle_dir: str | Path) -> dict | None:
    """The ``demo.json`` stamp of a demo bundle, or None when absent or unreadable."""
    path = Path(bundle_dir) / STAMP_FILE
    if not path.is_file() or not (Path(bundle_dir) / "manifest.json").is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _stamp_matches(old: dict | None, want: dict) -> bool:
    if old is None:
        return False
    return all(old.get(k) == want[k] for k in ("demo_format", "world_sha256", "models_sha256", "subjects"))


# --------------------------------------------------------------------------------------------- build
def _choose_alphas(subject, store) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """One alpha per feature by exact leave-one-out R^2 on ``subject`` (a column sample of each feature)."""
    from ..ridge import choose_alpha, factorise

    ids = np.asarray(subject.train_image_ids, np.int64)
    fact = factorise(np.asarray(subject.train_fmri, np.float32), backend="auto")
    alphas, scores = {}, {}
    for name in FEATURE_NAMES:
        n_cols = int(np.prod(store.shape(name)))
        rng = np.random.default_rng(0)
        cols = np.sort(rng.choice(n_cols, size=min(_ALPHA_COLUMNS, n_cols), replace=False))
        y = np.asarray(store.get(name, ids), np.float32).reshape(len(ids), -1)[:, cols]
        best, sc = choose_alpha(fact, y, list(ALPHA_GRID))
        alphas[name] = float(best)
        scores[name] = {f"{a:g}": round(float(s), 5) for a, s in sc.items()}
    return alphas, scores


def ensure_demo_bundle(
    cache_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    models_dir: str | Path | None = None,
    *,
    world_root: str | Path | None = None,
    subjects: Sequence[int] | None = None,
    bundle_dir: str | Path | None = None,
    device: str = "cpu",
) -> Path:
    """The folder of a current demo bundle, built first if missing or stale.

    Parameters
    ----------
    cache_dir : path, optional
        Parent folder of the world, the untrained fallback models, the features and the bundle; default
        :func:`brain_diffuser_core.config.cache_root`.
    progress : callable(step: str, done: int, total: int), optional
        Called after each step (the world build's steps, then extraction batches and subject fits).
    models_dir : path, optional
        Trained demo models (default :data:`DEFAULT_MODELS_DIR`, ``assets/demo/models``). When they are absent
        the untrained tiny fallback is used (see the module docstring).
    world_root : path, optional
        An existing MiniNSD world (``build_world`` output) to use instead of ``ensure_world(cache_dir)``.
    subjects : sequence of int, optional
        Subjects to fit (default: every subject of the world).
    bundle_dir : path, optional
        Where the bundle lives (default ``<cache_dir>/demo-bundle``).
    device : where the feature extraction runs ("cpu" default).

    Returns
    -------
    Path
        Bundle folder: ``load_bundle(path)`` / ``BrainDiffuser(path)`` read it; its manifest references the
        models it was fitted for.
    """
    from .build import ensure_world, read_world_info

    cache = Path(cache_dir) if cache_dir is not None else cache_root()

    # 1. The world
    if world_root is None:
        world_root = ensure_world(cache, progress=progress)
    world_root = Path(world_root)
    world_sha, params = _world_digest(world_root)
    world_subjects = sorted(int(s) for s in read_world_info(world_root).params["subjects"])
    subjects = world_subjects if subjects is None else sorted(int(s) for s in subjects)
    bad = [s for s in subjects if s not in world_subjects]
    if bad or not subjects:
        raise ValueError(f"'subjects' must be a non-empty subset of the world's subjects {world_subjects}; "
                         f"{list(subjects)} was provided")

    # 2. The models (trained, else the untrained tiny fallback)
    models_dir = Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR
    trained = demo_models_present(models_dir)
    if not trained:
        log.warning(NOT_TRAINED_MESSAGE)
        models_dir = ensure_untrained_models(cache / "demo-models-untrained")
    digest = models_digest(models_dir)
    want = {"demo_format": DEMO_FORMAT_VERSION, "world_sha256": world_sha, "models_sha256": digest,
            "subjects": subjects}
    bundle_dir = Path(bundle_dir) if bundle_dir is not None else cache / "demo-bundle"
    if _stamp_matches(read_demo_stamp(bundle_dir), want):
        return bundle_dir
    return _build(bundle_dir, cache, world_root, models_dir, trained, want, params, progress, device)


def _build(bundle_dir: Path, cache: Path, world_root: Path, models_dir: Path, trained: bool, want: dict,
           params: dict, progress: ProgressFn | None, device: str) -> Path:
    import torch

    from ..cli.fit import fit_subject_bundle
    from ..features.clip import ClipFeatureExtractor
    from ..features.extract import extract_features
    from ..features.store import FeatureStore
    from ..features.vdvae import load_vdvae
    from ..nsd import load_subject

    start = time.perf_counter()
    subjects = want["subjects"]
    total = 2 + len(subjects)
    done = 0

    def tick(step: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(step, done, total)

    # 1. Subjects (prepared arrays cached beside the world)
    nsd_cache = cache / "nsd"
    subs = {s: load_subject(world_root, s, cache_dir=nsd_cache, progress=False) for s in subjects}
    tick("demo: subjects loaded")

    # 2. Features of every image the subjects saw, through the extract loop (one store for all subjects)
    feats_root = cache / "demo-features"
    feats_dir = feats_root / f"{want['world_sha256'][:12]}-{want['models_sha256'][:12]}"
    if feats_root.is_dir():  # features of older worlds or models
        for old in feats_root.iterdir():
            if old.is_dir() and old != feats_dir:
                shutil.rmtree(old, ignore_errors=True)
    vdvae_path = models_dir / VDVAE_FILE
    vd_path = models_dir / VD_FOLDER
    with torch.inference_mode():
        vdvae = load_vdvae(vdvae_path, device=device)
        clip = ClipFeatureExtractor.from_pretrained(vd_path, device=device)
        for s in subjects:
            extract_features(subs[s], feats_dir, vdvae=vdvae, clip=clip, batch_size=64, dtype="float16")
    store = FeatureStore(feats_dir)
    tick("demo: features extracted")

    # 3. Decoders through the fit path, one alpha per feature chosen on the first subject
    alphas, scores = _choose_alphas(subs[subjects[0]], store)
    flag = TRAINED_KEY if trained else UNTRAINED_KEY
    models = {
        "vdvae": {"path": str(vdvae_path.resolve()), "sha256": sha256_file(vdvae_path)},
        "versatile_diffusion": {"path": str(vd_path.resolve()), "sha256": want["models_sha256"]},
        flag: {"path": str(models_dir.resolve()), "sha256": want["models_sha256"]},
    }
    with atomic_dir(bundle_dir) as tmp:
        for s in subjects:
            fit_subject_bundle(subs[s], store, tmp, alphas=alphas, models=models, dtype="float16",
                               backend="auto", loo_stats=_LOO_ROWS)
            tick(f"demo: subject {s} fitted")
        stamp = dict(want, models_trained=trained, models_dir=str(models_dir.resolve()), world_root=str(world_root),
                     world_params=params, alphas=alphas, alpha_loo_r2=scores,
                     build_seconds=round(time.perf_counter() - start, 2))
        if not trained:
            stamp["note"] = NOT_TRAINED_MESSAGE
        atomic_write_json(tmp / STAMP_FILE, stamp)
    return bundle_dir
