"""Sources for the batch tests: the app's 2-subject MiniNSD world and tiny bundle (tests/app_sources.py, the
session's ``sources`` fixture), with a copy of the bundle whose voxel-mask checksums are the world's (the CLI
commands check them; the app does not)."""
from __future__ import annotations

import shutil
from pathlib import Path


def make_batch_sources(sources: tuple[str, str, str], tmp_path: str | Path) -> tuple[str, str, str]:
    """(bundle copy, world root, prepared cache), str paths; subjects 1 and 2."""
    from brain_diffuser_core.bundle import SubjectDecoders, load_bundle, save_bundle
    from brain_diffuser_core.config import FEATURE_NAMES
    from brain_diffuser_core.nsd import load_subject

    src, world, cache = sources
    bundle = Path(tmp_path) / "bundle"
    shutil.copytree(src, bundle)
    b = load_bundle(bundle)
    entries = {}
    for s in b.subjects:
        sub = load_subject(world, s, cache_dir=cache, progress=False)
        entries[s] = SubjectDecoders(n_voxels=sub.n_voxels, mask_sha256=sub.mask_sha256,
                                     decoders={f: b.decoder(s, f) for f in FEATURE_NAMES},
                                     train_feature_norm={f: b.train_feature_norm(s, f) for f in FEATURE_NAMES})
    save_bundle(bundle, entries, feature_shapes={f: b.feature_shape(f) for f in FEATURE_NAMES},
                models=b.manifest["models"], update=True)
    return str(bundle), world, cache
