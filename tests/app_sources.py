"""Data sources for the app's tests: a small MiniNSD world and a tiny random-weight bundle fitted to its voxel
counts (the real data and pipeline code paths, tiny models). Used by tests/test_app.py and tests/test_browser.py.
"""
from __future__ import annotations

from pathlib import Path


def make_app_sources(tmp_path: str | Path) -> tuple[str, str, str]:
    """Build (bundle folder, world root, cache folder) under ``tmp_path``; all three are str paths.

    The world has subjects 1 and 2 (40 train and 6 test images, 12 test trials in all); the bundle holds tiny
    decoders for both subjects sharing one tiny model folder. ``cache`` is the prepared-fMRI cache the loaders
    used (pass it as ``cache_dir`` to :func:`brain_diffuser_core.nsd.load_subject`).
    """
    from brain_diffuser_core.bundle import SubjectDecoders, load_bundle, save_bundle
    from brain_diffuser_core.config import FEATURE_NAMES
    from brain_diffuser_core.nsd import load_subject
    from brain_diffuser_core.tiny_bundle import make_tiny_bundle
    from brain_diffuser_core.world.build import build_world

    tmp = Path(tmp_path)
    info = build_world(tmp / "world", n_train=40, n_test=6, subjects=(1, 2))
    cache = tmp / "cache"
    n_vox = {s: load_subject(info.root, s, cache_dir=cache, progress=False).n_voxels for s in (1, 2)}
    models = tmp / "models"
    main = make_tiny_bundle(tmp / "bundle", subjects=(1,), n_voxels=n_vox[1] - 1, models_folder=models)
    other = load_bundle(make_tiny_bundle(tmp / "bundle2", subjects=(2,), n_voxels=n_vox[2] - 2, models_folder=models))
    b = load_bundle(main)
    entry = SubjectDecoders(n_voxels=n_vox[2], mask_sha256="tiny-2",
                            decoders={f: other.decoder(2, f) for f in FEATURE_NAMES},
                            train_feature_norm={f: other.train_feature_norm(2, f) for f in FEATURE_NAMES})
    save_bundle(main, {2: entry}, feature_shapes={f: b.feature_shape(f) for f in FEATURE_NAMES},
                models=b.manifest["models"], update=True)
    return str(main), str(info.root), str(cache)
