"""A complete tiny bundle (decoders + tiny VDVAE + tiny Versatile Diffusion) for tests and CPU benchmarks.

Everything goes through the real code paths: the generative models are written in their real folder layouts
(:mod:`brain_diffuser_core.tiny_models`, :func:`~brain_diffuser_core.features.vdvae.save_vdvae`), the decoders
are fitted by :func:`~brain_diffuser_core.ridge.fit_ridge` on synthetic fMRI and saved by
:func:`~brain_diffuser_core.bundle.save_bundle`. Nothing here is meaningful science: the weights are random.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .config import FEATURE_NAMES, PAPER
from .seeding import seed_for

__all__ = ["make_tiny_bundle"]


def make_tiny_bundle(folder: str | Path, *, subjects: Sequence[int] = (1,), n_voxels: int = 40, n_train: int = 30,
                     seed: int = 0, models_folder: str | Path | None = None) -> Path:
    """Write a tiny bundle at ``folder`` (models under ``models_folder``, default ``folder/../tiny-models``).

    Subject ``s`` has ``n_voxels + s`` voxels (so subjects differ, as in NSD) and decoders for every feature of
    :data:`~brain_diffuser_core.config.FEATURE_NAMES`, fitted with the paper's alphas scaled down to the tiny
    sizes. Returns the bundle folder.
    """
    import torch

    from .bundle import SubjectDecoders, save_bundle
    from .features.clip import ClipFeatureExtractor
    from .features.vdvae import VDVAE, VDVAEConfig, save_vdvae
    from .ridge import fit_ridge
    from .target_axes import principal_axes
    from .tiny_models import make_tiny_vd

    folder = Path(folder)
    models_folder = Path(models_folder) if models_folder is not None else folder.parent / "tiny-models"
    vd_path = models_folder / "versatile-diffusion"
    vdvae_path = models_folder / "vdvae.safetensors"
    if not (vd_path / "model_index.json").exists():
        make_tiny_vd(vd_path, seed=seed)
    config = VDVAEConfig.tiny(32)
    if not vdvae_path.exists():
        torch.manual_seed(seed)
        save_vdvae(VDVAE(config).eval(), vdvae_path)
    dim = ClipFeatureExtractor.from_pretrained(vd_path).dim
    shapes = {
        "vdvae": (config.feature_dim(),),
        "clip_text": (PAPER.stage2.text_tokens, dim),
        "clip_vision": (PAPER.stage2.vision_tokens, dim),
    }
    entries = {}
    for subject in subjects:
        rng = np.random.default_rng(seed_for("tiny-bundle", subject, base_seed=seed))
        n_vox = n_voxels + int(subject)
        x = rng.standard_normal((n_train, n_vox)).astype(np.float32)
        decoders, norms = {}, {}
        for name in FEATURE_NAMES:
            n_targets = int(np.prod(shapes[name]))
            w = rng.standard_normal((n_vox, n_targets)).astype(np.float32) / np.sqrt(n_vox)
            y = x @ w + 0.1 * rng.standard_normal((n_train, n_targets)).astype(np.float32)
            decoders[name] = fit_ridge(x, y, alpha=PAPER.ridge_alpha(name) / 1e4, backend="numpy")
            decoders[name].add_target_axes(*principal_axes(lambda a, b, _y=y: _y[:, a:b], n_train, n_targets,
                                                           y.mean(0)))
            norms[name] = float(np.linalg.norm(y, axis=1).mean())
        entries[int(subject)] = SubjectDecoders(n_voxels=n_vox, mask_sha256=f"tiny-{subject}", decoders=decoders,
                                                train_feature_norm=norms)
    models = {"vdvae": {"path": str(vdvae_path.resolve())},
              "versatile_diffusion": {"path": str(vd_path.resolve())}}
    return save_bundle(folder, entries, feature_shapes=shapes, models=models)
