"""The paper's ROI figure on demand: ROI-optimal scenes for every ROI x (each subject + the subject average).

:func:`make_roi_grid` runs both stages for each cell (a catalogue ROI's pattern, 1 inside and 0 elsewhere,
through :meth:`~brain_diffuser_core.pipeline.BrainDiffuser.reconstruct_pattern`) with a few seeds; cell seeds are
``seed_for("pattern", "grid/<roi>/<column>", k, base_seed=base_seed)``, so any cell reproduces alone.
:meth:`RoiGrid.to_image` lays it out as one labelled picture (rows = ROIs, columns = subjects x seeds).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .rois import PAPER_ROIS, roi_names
from .seeding import seed_for

__all__ = ["GRID_ROIS", "AVERAGE_COLUMN", "RoiGrid", "make_roi_grid", "cell_seeds"]

#: rows of the paper's ROI figure: its eight ROIs, then the five eccentricity bands (inner to outer)
GRID_ROIS: tuple[str, ...] = tuple(PAPER_ROIS) + tuple(roi_names("eccentricity"))
#: column label of the subject average
AVERAGE_COLUMN = "average"

ProgressFn = Callable[[str, int, int], None]


def cell_seeds(roi: str, column: str, n_seeds: int, base_seed: int = 0) -> list[int]:
    """The seeds of one cell: ``seed_for("pattern", f"grid/{roi}/{column}", k, base_seed=base_seed)``."""
    return [seed_for("pattern", f"grid/{roi}/{column}", k, base_seed=base_seed) for k in range(int(n_seeds))]


@dataclass
class RoiGrid:
    """ROI-optimal scenes: ``images[(roi, column)]`` uint8 (n_seeds, H, W, 3); columns "subj01" ... "average"."""

    rois: list[str]
    columns: list[str]
    n_seeds: int
    images: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    seeds: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def to_image(self, cell: int = 80) -> np.ndarray:
        """One labelled picture, uint8 (H, W, 3): a row per ROI, a block of ``n_seeds`` tiles per column."""
        from PIL import Image, ImageDraw

        left, top, gap = 64, 18, 6
        block = self.n_seeds * cell + gap
        sheet = Image.new("RGB", (left + len(self.columns) * block, top + len(self.rois) * cell), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for j, col in enumerate(self.columns):
            draw.text((left + j * block + 2, 3), col, fill=(0, 0, 0))
        for i, roi in enumerate(self.rois):
            draw.text((4, top + i * cell + cell // 2 - 6), roi, fill=(0, 0, 0))
            for j, col in enumerate(self.columns):
                for k, im in enumerate(self.images.get((roi, col), [])):
                    tile = Image.fromarray(np.asarray(im, np.uint8)).resize((cell, cell), Image.BICUBIC)
                    sheet.paste(tile, (left + j * block + k * cell, top + i * cell))
        return np.asarray(sheet, dtype=np.uint8)


def make_roi_grid(diffuser, subject_data: Mapping[int, object], *, rois: Sequence[str] = GRID_ROIS,
                  n_seeds: int = 2, with_average: bool = True, base_seed: int = 0,
                  progress: ProgressFn | None = None, **overrides) -> RoiGrid:
    """ROI-optimal scenes for ``rois`` x (each subject of ``subject_data`` [+ their average]).

    subject_data : subject -> an object with ``synthetic_pattern({roi: 1.0})`` (float32 (n_voxels,)), e.g. a
        :class:`~brain_diffuser_core.nsd.Subject`; ROIs missing from a subject are skipped for it.
    overrides : stage settings for generation (e.g. ``num_inference_steps=20``).
    progress : called as ``progress(cell label, cells done, cells in all)`` after each cell.
    """
    if int(n_seeds) < 1:
        raise ValueError(f"'n_seeds' must be >= 1; {n_seeds!r} was provided")
    subjects = [int(s) for s in subject_data]
    if not subjects:
        raise ValueError("'subject_data' must hold at least one subject; none was provided")
    columns: list[tuple[str, list[int]]] = [(f"subj{s:02d}", [s]) for s in subjects]
    if with_average and len(subjects) > 1:
        columns.append((AVERAGE_COLUMN, subjects))
    grid = RoiGrid(rois=list(rois), columns=[c for c, _ in columns], n_seeds=int(n_seeds))
    total, done = len(grid.rois) * len(columns), 0
    for roi in grid.rois:
        patterns = {}
        for s in subjects:
            try:
                patterns[s] = subject_data[s].synthetic_pattern({roi: 1.0})
            except (KeyError, ValueError):
                continue  # this subject has no such ROI
        for label, members in columns:
            done += 1
            if all(m in patterns for m in members) and any(np.any(patterns[m]) for m in members):
                seeds = cell_seeds(roi, label, n_seeds, base_seed)
                recs = diffuser.reconstruct_pattern({m: patterns[m] for m in members}, name=f"grid/{roi}/{label}",
                                                    seeds=seeds, **overrides)
                grid.images[(roi, label)] = np.stack([r.final if r.final is not None else r.stage1_upscaled
                                                      for r in recs])
                grid.seeds[(roi, label)] = seeds
            if progress is not None:
                progress(f"{roi} / {label}", done, total)
    return grid
