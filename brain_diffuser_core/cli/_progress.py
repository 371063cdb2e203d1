"""A tqdm bar driven by the library's ``progress(step, done, total)`` callbacks."""
from __future__ import annotations

from typing import Callable


def step_bar(desc: str, unit: str, disable: bool = False) -> tuple[object, Callable[[str, int, int], None]]:
    """Return ``(bar, progress)``: ``progress(step, done, total)`` moves ``bar`` to ``done`` of ``total``."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, disable=disable)

    def progress(step: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(step, refresh=False)
        bar.update(done - bar.n)

    return bar, progress
