"""A toy batch job for the batch layer's tests (no models: each item is 64 seeded float32 values), importable
by Ray workers too (the tests put tests/ on their PYTHONPATH)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from brain_diffuser_core.batch import Item, ItemOutput
from brain_diffuser_core.seeding import seed_for


@dataclass
class ToyJob:
    """n items "i000".., each -> out/<key>_vec.bin; ``fail_keys`` raise every time; every computation appends
    its key to ``calls_file`` (to count them)."""

    n: int = 10
    scale: float = 1.0
    fail_keys: tuple = ()
    calls_file: str | None = None
    kind: str = "toy"
    batch_size: int = 1
    device: str = "cpu"

    def settings(self) -> dict:
        return {"n": self.n, "scale": self.scale}

    def items(self) -> list[Item]:
        return [Item(f"i{k:03d}", {"k": k}) for k in range(self.n)]

    def open_worker(self):
        return ToyWorker(self)


class ToyWorker:
    def __init__(self, job: ToyJob):
        self.job = job

    def run(self, items):
        out = []
        for it in items:
            if self.job.calls_file:
                with open(self.job.calls_file, "a") as f:
                    f.write(f"{it.key} {os.getpid()}\n")
            if it.key in self.job.fail_keys:
                raise RuntimeError(f"toy failure on {it.key}")
            rng = np.random.default_rng(seed_for("toy", it.key))
            vec = (rng.standard_normal(64) * self.job.scale).astype(np.float32)
            out.append(ItemOutput(it.key, {f"out/{it.key}_vec.bin": vec.tobytes()}, {"sum": float(vec.sum())}))
        return out


def calls(path) -> list[str]:
    """Keys computed so far (one line per computation)."""
    try:
        return [line.split()[0] for line in open(path).read().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
