"""The MiniNSD demo bundle: decoders for every world subject, fitted on features of the demo models.

:func:`ensure_demo_bundle` is what the app calls on first run. It

1. makes sure the MiniNSD world exists (:func:`~brain_diffuser_core.world.build.ensure_world`);
2. takes the demo models from ``assets/demo/models/`` (``vdvae.safetensors`` + ``vdvae.json`` and a
   Versatile Diffusion folder ``versatile-diffusion/`` with the CLIP towers inside, as written by
   ``python -m brain_diffuser_core world train``, see :mod:`brain_diffuser_core.world.train`), checked
   against their ``MANIFEST.json`` (:func:`verify_demo_models`, see "Demo model checks" below). When the
   folder holds no model file at all it falls back to untrained tiny random models of the same architectures
   (written once into the cache), logs "demo models not trained yet: run `python -m brain_diffuser_core world
   train`" and flags it in the bundle manifest's ``models`` section (a reference named :data:`UNTRAINED_KEY`
   instead of :data:`TRAINED_KEY`) and in ``demo.json``;
3. extracts the world images' features with those models through the ``extract`` loop
   (:func:`~brain_diffuser_core.features.extract.extract_features`);
4. fits the decoders of every world subject through the ``fit`` path
   (:func:`~brain_diffuser_core.cli.fit.fit_subject_bundle`), one ridge alpha per feature chosen by exact
   leave-one-out on the first subject (the paper too uses one alpha per feature for all subjects; its alphas
   suit 8,859 images x 15,724 voxels, not the world's sizes);
5. writes the bundle atomically to ``<cache>/demo-bundle`` with a stamp (``demo.json``): the bundle is rebuilt
   when the world's files, the models' checksums, the subjects or :data:`DEMO_FORMAT_VERSION` change.

Demo model checks
-----------------
``world train`` ends by writing ``<models>/MANIFEST.json`` (:func:`write_models_manifest`): relative path,
size in bytes and sha256 of every model file (``vdvae.safetensors``, ``vdvae.json``, every file under
``versatile-diffusion/``; not ``training.json``, ``README*`` or the manifest itself). ``ensure_demo_bundle``
then decides:

* ``MANIFEST.json`` present: every listed file must exist with its size and sha256, else
  :class:`DemoModelsError` naming each missing or corrupt file and the two fixes (restore the shipped files
  with ``git checkout -- assets/demo/models``, or rebuild them with ``python -m brain_diffuser_core world
  train --out assets/demo/models``, about 1.5-2 h on 2 CPU cores). No silent fallback.
* no model file at all: the untrained fallback above (flagged).
* some model files but no manifest: :class:`DemoModelsError` naming the files of the demo layout
  (:data:`REQUIRED_FILES`) that are missing; when none is missing the folder is used with a logged warning
  that it cannot be checked (write the manifest with ``world train --manifest-only --out DIR``).

Checksums cost about 0.05 s per 10 MB (measured: 0.051 s for the 11.5 MB demo models, cold memo, warm page
cache; 0.001 s from memory, 0.005 s from the memo file). Each file's sha256 is computed once per content and
remembered, keyed by (absolute path, size, mtime_ns, ctime_ns, inode), in memory and in
``<cache>/demo-models-checksums.json`` (:data:`CHECKSUMS_FILE`). Any write to a file changes its ctime
(which ``touch`` cannot set back), so an edited file is hashed again; ``models_digest`` shares the memo.

A full disk while the world, the features or the bundle are written raises :class:`DemoDiskFullError` (an
``OSError`` with errno ENOSPC) naming the folder and saying how to pick another cache
(``BRAIN_DIFFUSER_CACHE``); the bundle folder is written through :func:`~brain_diffuser_core.io.atomic_dir`,
so a failed build leaves either nothing or the previous bundle (whose stamp does not match), never a
complete-looking one.

With the trained demo models the whole build takes about 81 s after the world (about 22 s) on this project's
2-core machines with one torch thread (measured 2026-12-02, ``benchmarks/demo_latency.py --threads 1``). On a machine whose cores are
already busy, two torch threads are several times slower than one (oversubscription): set
``torch.set_num_threads(1)`` there.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..config import FEATURE_NAMES, cache_root
from ..io import atomic_dir, atomic_write_json, sha256_file

__all__ = [
    "DEMO_FORMAT_VERSION",
    "DEFAULT_MODELS_DIR",
    "TRAINED_KEY",
    "UNTRAINED_KEY",
    "NOT_TRAINED_MESSAGE",
    "MANIFEST_FILE",
    "REQUIRED_FILES",
    "CHECKSUMS_FILE",
    "DemoModelsError",
    "DemoDiskFullError",
    "explain_disk_full",
    "model_files",
    "write_models_manifest",
    "verify_demo_models",
    "models_digest",
    "ensure_untrained_models",
    "ensure_demo_bundle",
    "read_demo_stamp",
]

log = logging.getLogger(__name__)

#: bump when the bundle's recipe changes (alpha grid, extraction settings, ...): cached bundles are rebuilt
DEMO_FORMAT_VERSION = 2  # 2: decoders carry their training targets' principal axes (bundle format 3)
#: the trained demo models shipped with the repository
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo" / "models"
VDVAE_FILE = "vdvae.safetensors"
VD_FOLDER = "versatile-diffusion"
#: name of the models-section reference that says which demo models the decoders were fitted for
TRAINED_KEY = "demo_models"
UNTRAINED_KEY = "untrained_random_demo_models"
NOT_TRAINED_MESSAGE = "demo models not trained yet: run `python -m brain_diffuser_core world train`"
STAMP_FILE = "demo.json"
#: the models folder's list of files with their sizes and sha256 (written by ``world train``)
MANIFEST_FILE = "MANIFEST.json"
MANIFEST_FORMAT = 1
#: files the demo layout cannot do without (checked when a folder has model files but no manifest)
REQUIRED_FILES: tuple[str, ...] = (
    VDVAE_FILE,
    "vdvae.json",
    f"{VD_FOLDER}/model_index.json",
    f"{VD_FOLDER}/text_encoder/config.json",
    f"{VD_FOLDER}/text_encoder/model.safetensors",
    f"{VD_FOLDER}/image_encoder/config.json",
    f"{VD_FOLDER}/image_encoder/model.safetensors",
    f"{VD_FOLDER}/image_unet/config.json",
    f"{VD_FOLDER}/image_unet/diffusion_pytorch_model.safetensors",
    f"{VD_FOLDER}/text_unet/config.json",
    f"{VD_FOLDER}/text_unet/diffusion_pytorch_model.safetensors",
    f"{VD_FOLDER}/vae/config.json",
    f"{VD_FOLDER}/vae/diffusion_pytorch_model.safetensors",
    f"{VD_FOLDER}/scheduler/scheduler_config.json",
    f"{VD_FOLDER}/tokenizer/vocab.json",
    f"{VD_FOLDER}/tokenizer/merges.txt",
    f"{VD_FOLDER}/image_feature_extractor/preprocessor_config.json",
)
#: remembered sha256 of model files, under the cache folder
CHECKSUMS_FILE = "demo-models-checksums.json"
#: how long a rebuild takes (said in error messages)
REBUILD_TIME = "about 1.5-2 h on 2 CPU cores"
#: ridge alphas tried per feature (exact leave-one-out on the first subject)
ALPHA_GRID: tuple[float, ...] = (1e2, 1e3, 1e4, 1e5, 1e6, 1e7)
#: target columns sampled to score the alphas, and train rows for the leave-one-out rescaling statistics
_ALPHA_COLUMNS = 256
_LOO_ROWS = 512

ProgressFn = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------- errors
class DemoModelsError(RuntimeError):
    """The demo models folder is unusable: missing or corrupt files (named), with the ways to fix it.

    Attributes: ``models_dir`` (Path) and ``problems`` ({relative path: "missing" | "corrupt: ..."}).
    """

    def __init__(self, models_dir: str | Path, problems: dict[str, str], note: str = ""):
        self.models_dir = Path(models_dir)
        self.problems = dict(problems)
        lines = [f"the demo models in {self.models_dir} are not usable{note}:"]
        lines += [f"  - {rel}: {why}" for rel, why in self.problems.items()]
        lines.append(_fix_text(self.models_dir))
        super().__init__("\n".join(lines))


class DemoDiskFullError(OSError):
    """The disk filled up while the demo (world, features, bundle) was written; ``errno`` is ENOSPC.

    ``str(err)`` names the folder and how to choose another cache (``BRAIN_DIFFUSER_CACHE``).
    """


def _display_dir(models_dir: Path) -> str:
    """``assets/demo/models`` for the shipped folder (commands run from the repository root), else the path."""
    return "assets/demo/models" if Path(models_dir).resolve() == DEFAULT_MODELS_DIR else str(models_dir)


def _fix_text(models_dir: Path) -> str:
    where = _display_dir(models_dir)
    restore = ("restore the shipped files with `git checkout -- assets/demo/models`" if where == "assets/demo/models"
               else "restore the files from where they came (the shipped demo models: `git checkout -- "
                    "assets/demo/models`)")
    return f"fix: {restore}, or rebuild them with `python -m brain_diffuser_core world train --out {where}` " \
           f"({REBUILD_TIME})."


# --------------------------------------------------------------------------------------------- checksums
_MEMO: dict[str, dict] = {}
_MEMO_LOCK = threading.Lock()
#: memo file -> {absolute path: stat key} of the entries that file holds (read once per process)
_PERSISTED: dict[str, dict[str, list]] = {}


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino)]


def _load_memo(memo_file: Path) -> dict[str, list]:
    """Merge ``memo_file``'s entries into memory (once per process); returns what the file holds."""
    name = str(memo_file)
    if name not in _PERSISTED:
        held: dict[str, list] = {}
        try:
            saved = json.loads(Path(memo_file).read_text())
            for k, v in saved.get("files", {}).items():
                if isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("stat"), list):
                    held[k] = list(v["stat"])
                    _MEMO.setdefault(k, {"stat": list(v["stat"]), "sha256": v["sha256"]})
        except (OSError, ValueError, AttributeError):  # absent or damaged: start afresh
            pass
        _PERSISTED[name] = held
    return _PERSISTED[name]


def _sha256_memo(path: Path, memo_file: Path | None = None) -> str:
    """sha256 of ``path``, computed once per (absolute path, size, mtime_ns, ctime_ns, inode).

    The answers live in memory and, when ``memo_file`` is given, in that JSON file ({"files": {path:
    {"stat": [...], "sha256": hex}}}, read once per process, rewritten atomically when it lacks an answer;
    an unreadable memo file is ignored, one that cannot be written only costs time).
    """
    key = str(Path(path).resolve())
    stat = _stat_key(Path(path))
    with _MEMO_LOCK:
        held = _load_memo(memo_file) if memo_file is not None else None
        hit = _MEMO.get(key)
        digest = hit["sha256"] if hit is not None and hit["stat"] == stat else None
    if digest is None:
        digest = sha256_file(path)
    with _MEMO_LOCK:
        _MEMO[key] = {"stat": stat, "sha256": digest}
        if held is not None and held.get(key) != stat:
            keep = {k: _MEMO[k] for k in list(held) + [key] if k in _MEMO}
            try:
                atomic_write_json(memo_file, {"files": keep})
                held.clear()
                held.update({k: v["stat"] for k, v in keep.items()})
            except OSError as err:
                log.debug("could not save the checksum memo %s: %s", memo_file, err)
    return digest


# --------------------------------------------------------------------------------------------- models
def model_files(models_dir: str | Path) -> list[str]:
    """Relative paths (posix) of the model files present in ``models_dir``: ``vdvae.safetensors``,
    ``vdvae.json`` (in that order, as :func:`models_digest` hashes them) and every file under
    ``versatile-diffusion/`` (sorted); not training.json, README or the manifest."""
    d = Path(models_dir)
    files = [name for name in (VDVAE_FILE, "vdvae.json") if (d / name).is_file()]
    if (d / VD_FOLDER).is_dir():
        files += sorted(p.relative_to(d).as_posix() for p in (d / VD_FOLDER).rglob("*") if p.is_file())
    return files


def _missing_required(models_dir: Path) -> dict[str, str]:
    """{relative path: "missing"} for each file of :data:`REQUIRED_FILES` absent from ``models_dir``."""
    return {rel: "missing" for rel in REQUIRED_FILES if not (models_dir / rel).is_file()}


def write_models_manifest(models_dir: str | Path, *, memo_file: str | Path | None = None) -> Path:
    """Write ``<models_dir>/MANIFEST.json``: {"format": 1, "files": {relative path: {"size": bytes,
    "sha256": hex}}} for every :func:`model_files` entry. Returns the manifest's path.

    Raises :class:`DemoModelsError` when a file of :data:`REQUIRED_FILES` is missing (a manifest of a partial
    folder would make it look complete).
    """
    d = Path(models_dir)
    missing = _missing_required(d)
    if missing:
        raise DemoModelsError(d, missing, note=f" (no {MANIFEST_FILE} written)")
    files = {rel: {"size": (d / rel).stat().st_size,
                   "sha256": _sha256_memo(d / rel, Path(memo_file) if memo_file else None)}
             for rel in model_files(d)}
    path = d / MANIFEST_FILE
    atomic_write_json(path, {"format": MANIFEST_FORMAT, "files": files})
    return path


def verify_demo_models(models_dir: str | Path, *, memo_file: str | Path | None = None) -> dict[str, dict]:
    """Check every file listed in ``<models_dir>/MANIFEST.json`` against its size and sha256.

    memo_file : JSON file remembering checksums across processes (default ``<cache_root()>/`` +
        :data:`CHECKSUMS_FILE`); each file is hashed once per content (see the module docstring).
    Returns the manifest's ``files`` mapping. Raises :class:`DemoModelsError` naming every missing or corrupt
    file (or an absent / unreadable manifest) and how to restore or rebuild the models.
    """
    d = Path(models_dir)
    memo = Path(memo_file) if memo_file is not None else cache_root() / CHECKSUMS_FILE
    path = d / MANIFEST_FILE
    if not path.is_file():
        raise DemoModelsError(d, {MANIFEST_FILE: "missing (write it with `python -m brain_diffuser_core world "
                                                 f"train --manifest-only --out {_display_dir(d)}`)"})
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        entries = {str(rel): (int(v["size"]), str(v["sha256"])) for rel, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DemoModelsError(d, {MANIFEST_FILE: f"corrupt (expected JSON with 'files': {{path: {{size, sha256}}}}; "
                                                 f"{type(err).__name__}: {err})"}) from None
    problems: dict[str, str] = {}
    absent = [rel for rel in REQUIRED_FILES if rel not in entries]
    for rel in absent:
        problems[rel] = f"not listed in {MANIFEST_FILE}"
    for rel, (size, sha) in sorted(entries.items()):
        f = d / rel
        if not f.is_file():
            problems[rel] = "missing"
            continue
        got = f.stat().st_size
        if got != size:
            problems[rel] = f"corrupt (size {got} bytes, {MANIFEST_FILE} says {size})"
        elif _sha256_memo(f, memo) != sha:
            problems[rel] = f"corrupt (sha256 differs from {MANIFEST_FILE})"
    if problems:
        raise DemoModelsError(d, problems)
    return files


def models_digest(models_dir: str | Path, *, memo_file: str | Path | None = None) -> str:
    """sha256 over the relative paths and sha256 of every model file (VDVAE files and the VD folder).

    Per-file checksums come from the memo (see the module docstring): ``memo_file`` persists them."""
    d = Path(models_dir)
    memo = Path(memo_file) if memo_file is not None else None
    h = hashlib.sha256()
    for rel in model_files(d):
        h.update(f"{rel}\0{_sha256_memo(d / rel, memo)}\n".encode())
    return h.hexdigest()


def _check_models(models_dir: Path, memo_file: Path) -> bool:
    """True: use ``models_dir`` as trained models; False: no model file there (untrained fallback).

    Raises :class:`DemoModelsError` (see the module docstring)."""
    if (models_dir / MANIFEST_FILE).is_file():
        verify_demo_models(models_dir, memo_file=memo_file)
        return True
    present = model_files(models_dir)
    if not present:
        return False
    missing = _missing_required(models_dir)
    if missing:
        raise DemoModelsError(models_dir, missing,
                              note=f" (it holds {len(present)} model file(s) but no {MANIFEST_FILE})")
    log.warning("demo models in %s have no %s: their files cannot be checked; write one with "
                "`python -m brain_diffuser_core world train --manifest-only --out %s`",
                models_dir, MANIFEST_FILE, _display_dir(models_dir))
    return True


def ensure_untrained_models(folder: str | Path, seed: int = 0) -> Path:
    """Write (once) untrained tiny random demo models in the demo layout: a tiny VDVAE at the world's 64 px
    (:meth:`VDVAEConfig.tiny`) and the demo-size Versatile Diffusion (:func:`make_tiny_vd` ``size="demo"``).
    Returns the folder."""
    import torch

    from ..features.vdvae import VDVAE, VDVAEConfig, save_vdvae
    from ..tiny_models import make_tiny_vd
    from .scenes import IMAGE_SIZE

    folder = Path(folder)
    if not (folder / VD_FOLDER / "model_index.json").is_file():
        make_tiny_vd(folder / VD_FOLDER, seed=seed, size="demo")
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
def _choose_alphas(subject, store) -> tuple[dict[str, float], dict[str, dict[str, float]], object]:
    """One alpha per feature by exact leave-one-out R^2 on ``subject`` (a column sample of each feature).

    Returns ``(alphas, scores, factorisation)``: the subject's eigh factorisation, which its fit reuses."""
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
    return alphas, scores, fact


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
        Trained demo models (default :data:`DEFAULT_MODELS_DIR`, ``assets/demo/models``), verified against
        their ``MANIFEST.json``. When the folder holds no model file the untrained tiny fallback is used (see
        the module docstring).
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

    Raises
    ------
    DemoModelsError
        missing or corrupt model files (named), or a partial models folder without a manifest.
    DemoDiskFullError
        the disk filled up (names the folder and ``BRAIN_DIFFUSER_CACHE``); nothing complete-looking is left.
    """
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    folders = [cache] + ([Path(bundle_dir).parent] if bundle_dir is not None else [])
    with explain_disk_full(*folders):
        return _ensure(cache, progress, models_dir, world_root, subjects, bundle_dir, device)


@contextlib.contextmanager
def explain_disk_full(*folders: str | Path) -> Iterator[None]:
    """Re-raise a full-disk ``OSError`` (ENOSPC, EDQUOT) of the block as :class:`DemoDiskFullError` naming
    ``folders`` (where the demo writes) and how to choose another cache (``BRAIN_DIFFUSER_CACHE``); other
    errors pass unchanged. E.g. ``with explain_disk_full(cache_root()): ensure_world()``."""
    try:
        yield
    except OSError as err:
        full = err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        if not full or isinstance(err, DemoDiskFullError):
            raise
        raise _disk_full(err, folders) from err


def _disk_full(err: OSError, folders: Sequence[str | Path]) -> DemoDiskFullError:
    where = " and ".join(dict.fromkeys(str(f) for f in folders)) or str(cache_root())
    what = f" while writing {err.filename}" if err.filename else ""
    return DemoDiskFullError(
        err.errno,
        f"the disk is full{what} ({err.strerror or err}): the demo (world, features and decoder bundle) is "
        f"written under {where}. Free space there, or choose another cache folder with the BRAIN_DIFFUSER_CACHE "
        f"environment variable, e.g. `BRAIN_DIFFUSER_CACHE=/path/with/space streamlit run app.py`. "
        f"No incomplete bundle was kept.")


def _ensure(cache: Path, progress, models_dir, world_root, subjects, bundle_dir, device) -> Path:
    from .build import ensure_world, read_world_info

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

    # 2. The models (trained and verified, else the untrained tiny fallback when the folder holds none)
    models_dir = Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR
    memo = cache / CHECKSUMS_FILE
    trained = _check_models(models_dir, memo)
    if not trained:
        log.warning(NOT_TRAINED_MESSAGE)
        models_dir = ensure_untrained_models(cache / "demo-models-untrained")
    digest = models_digest(models_dir, memo_file=memo)
    want = {"demo_format": DEMO_FORMAT_VERSION, "world_sha256": world_sha, "models_sha256": digest,
            "subjects": subjects}
    bundle_dir = Path(bundle_dir) if bundle_dir is not None else cache / "demo-bundle"
    if _stamp_matches(read_demo_stamp(bundle_dir), want):
        return bundle_dir
    # one builder at a time across processes (two app servers, the app beside a CLI run): the second waits,
    # then finds the first one's bundle current instead of replacing it under the first one's readers
    with _build_lock(bundle_dir):
        if _stamp_matches(read_demo_stamp(bundle_dir), want):
            return bundle_dir
        return _build(bundle_dir, cache, world_root, models_dir, trained, want, params, progress, device)


@contextlib.contextmanager
def _build_lock(bundle_dir: Path) -> Iterator[None]:
    """An exclusive lock on ``<bundle_dir parent>/.<name>.lock`` (POSIX ``flock``; a no-op where missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; atomic_dir still never leaves a half bundle
        yield
        return
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(bundle_dir.parent / f".{bundle_dir.name}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


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
    alphas, scores, fact = _choose_alphas(subs[subjects[0]], store)
    flag = TRAINED_KEY if trained else UNTRAINED_KEY
    models = {
        "vdvae": {"path": str(vdvae_path.resolve()), "sha256": _sha256_memo(vdvae_path, cache / CHECKSUMS_FILE)},
        "versatile_diffusion": {"path": str(vd_path.resolve()), "sha256": want["models_sha256"]},
        flag: {"path": str(models_dir.resolve()), "sha256": want["models_sha256"]},
    }
    with atomic_dir(bundle_dir) as tmp:
        for s in subjects:
            # the first subject reuses the eigendecomposition its alpha search made (the same ridge solution as
            # fit_decoders' own fixed-alpha kernel path, up to float rounding); the others take that path
            fit_subject_bundle(subs[s], store, tmp, alphas=alphas, models=models, dtype="float16",
                               backend="auto", loo_stats=_LOO_ROWS, factorisation=fact if s == subjects[0] else None)
            fact = None  # free it (p x n + n x n float32)
            tick(f"demo: subject {s} fitted")
        stamp = dict(want, models_trained=trained, models_dir=str(models_dir.resolve()), world_root=str(world_root),
                     world_params=params, alphas=alphas, alpha_loo_r2=scores,
                     build_seconds=round(time.perf_counter() - start, 2))
        if not trained:
            stamp["note"] = NOT_TRAINED_MESSAGE
        atomic_write_json(tmp / STAMP_FILE, stamp)
    return bundle_dir
