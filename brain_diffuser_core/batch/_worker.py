"""What every model-holding batch worker does first, once per process or Ray actor: set torch's threads,
then open the BrainDiffuser (decoders + generative models), then load the subjects it needs.

Shared by the ``reconstruct``, ``sweep``, ``evaluate``, ``world validate`` and ``fit`` workers, so a worker
is opened the same way on every engine.
"""
from __future__ import annotations

from typing import Iterable

__all__ = ["set_threads", "open_diffuser", "load_subjects"]


def set_threads(threads: int | None) -> None:
    """torch CPU threads for this process (None: torch's default). First, before any model is built."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def open_diffuser(bundle: str, *, threads: int | None = None, device: str = "auto", paper: bool = False):
    """:func:`set_threads` then a :class:`~brain_diffuser_core.pipeline.BrainDiffuser` on ``bundle``."""
    set_threads(threads)
    from ..pipeline import BrainDiffuser

    return BrainDiffuser(bundle, device=device, paper=paper)


def load_subjects(nsd_root: str, subjects: Iterable[int], cache_dir: str | None = None) -> dict:
    """{subject: :class:`~brain_diffuser_core.nsd.Subject`} from the prepared cache (no progress bars: a
    worker's output would interleave with the driver's)."""
    from ..nsd import load_subject

    return {int(s): load_subject(nsd_root, int(s), cache_dir=cache_dir, progress=False) for s in subjects}


class _NoGenerativeModels:
    """Stands in for :class:`~brain_diffuser_core.pipeline.GenerativeModels` on a driver that only decodes and
    scores (the workers hold the real ones): it has a device and nothing to generate with."""

    def __init__(self, device):
        self.device = device

    def __getattr__(self, name):
        raise AttributeError(f"this BrainDiffuser holds the decoders only (no generative models: {name!r}); "
                             "generation runs in the batch workers")


def decoders_only(bundle, device: str = "auto"):
    """A BrainDiffuser on ``bundle`` (a path or Bundle) with its decoders but without loading the generative
    models: for a driver's decoding (``pattern_features``) and scoring, while the workers generate."""
    from ..pipeline import BrainDiffuser, resolve_device

    return BrainDiffuser(bundle, models=_NoGenerativeModels(resolve_device(device)))
