import numpy as np
import pytest

from brain_diffuser_core.pipeline import BrainDiffuser
from brain_diffuser_core.roi_grid import AVERAGE_COLUMN, cell_seeds, make_roi_grid
from brain_diffuser_core.tiny_bundle import make_tiny_bundle

FAST = dict(num_inference_steps=4)


class _Subject:
    """The one method make_roi_grid needs: a 0/1 pattern per ROI (here: a fixed block of voxels per ROI)."""

    def __init__(self, n_voxels, blocks):
        self.n_voxels, self.blocks = n_voxels, blocks

    def synthetic_pattern(self, weights):
        (roi, w), = weights.items()
        if roi not in self.blocks:
            raise ValueError(f"unknown ROI {roi!r}")
        p = np.zeros(self.n_voxels, np.float32)
        p[slice(*self.blocks[roi])] = w
        return p


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    bd = BrainDiffuser(make_tiny_bundle(tmp_path_factory.mktemp("grid") / "b", subjects=(1, 2)), device="cpu")
    data = {s: _Subject(bd.bundle.subject_info(s)["n_voxels"], {"V1": (0, 5), "faces": (5, 12)}) for s in (1, 2)}
    data[2].blocks.pop("faces")  # subject 2 lacks this ROI: its cell and the average's are left empty
    return bd, data


def test_grid_cells_columns_progress_and_picture(setup):
    bd, data = setup
    seen = []
    grid = make_roi_grid(bd, data, rois=["V1", "faces"], n_seeds=2, progress=lambda *a: seen.append(a), **FAST)
    assert grid.columns == ["subj01", "subj02", AVERAGE_COLUMN]
    assert sorted(grid.images) == [("V1", "average"), ("V1", "subj01"), ("V1", "subj02"), ("faces", "subj01")]
    assert all(v.shape[0] == 2 and v.dtype == np.uint8 for v in grid.images.values())
    assert [d for _, d, _ in seen] == list(range(1, 7)) and all(t == 6 for _, _, t in seen)
    picture = grid.to_image(cell=20)
    assert picture.shape == (18 + 2 * 20, 64 + 3 * (2 * 20 + 6), 3)
    # the picture holds the tiles: a generated cell is not the white background
    assert picture[18:38, 64:104].std() > 0
    with pytest.raises(ValueError, match="'n_seeds' must be >= 1"):
        make_roi_grid(bd, data, n_seeds=0)


def test_a_grid_cell_reproduces_alone(setup):
    bd, data = setup
    grid = make_roi_grid(bd, data, rois=["V1"], n_seeds=2, base_seed=3, **FAST)
    seeds = cell_seeds("V1", AVERAGE_COLUMN, 2, base_seed=3)
    alone = bd.reconstruct_pattern({s: data[s].synthetic_pattern({"V1": 1.0}) for s in (1, 2)},
                                   seeds=seeds[1:], **FAST)
    np.testing.assert_array_equal(grid.images[("V1", AVERAGE_COLUMN)][1], alone[0].final)
    assert grid.seeds[("V1", AVERAGE_COLUMN)] == seeds
