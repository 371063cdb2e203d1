import re

import numpy as np
import pytest

from brain_diffuser_core.rois import (
    PAPER_PRESETS,
    PAPER_ROIS,
    ROI_CATALOGUE,
    ROI_FILES,
    ROI_GROUPS,
    roi_mask_from_volumes,
    roi_names,
    roi_spec,
    synthetic_pattern_from_masks,
)
from nsd_fixtures import NSD_LABELS


def test_paper_v1_to_v4_come_from_prf_visualrois_not_floc_faces():
    assert roi_spec("V1").file == "prf-visualrois" and set(roi_spec("V1").labels) == {1, 2}
    assert roi_spec("V2").file == "prf-visualrois" and set(roi_spec("V2").labels) == {3, 4}
    assert roi_spec("V3").file == "prf-visualrois" and set(roi_spec("V3").labels) == {5, 6}
    assert roi_spec("V4").file == "prf-visualrois" and set(roi_spec("V4").labels) == {7}
    for cat in ("faces", "words", "places", "bodies"):
        assert roi_spec(cat).file == f"floc-{cat}" and roi_spec(cat).labels is None
    assert PAPER_ROIS == ("V1", "V2", "V3", "V4", "faces", "words", "places", "bodies")


def test_fine_and_eccentricity_rois_use_nsd_label_values():
    for file, names in NSD_LABELS.items():
        for value, name in enumerate(names, start=1):
            spec = roi_spec(name)
            assert (spec.file, spec.labels) == (file, (value,)), name
    assert roi_names("eccentricity") == NSD_LABELS["prf-eccrois"]
    assert set(roi_names("fine")) == {n for f, ns in NSD_LABELS.items() if f != "prf-eccrois" for n in ns}
    assert roi_names("early") == ["V1", "V2", "V3", "V4"]
    assert set(ROI_FILES) == set(NSD_LABELS)


def test_every_roi_has_a_group_and_a_hex_colour():
    assert sum(len(roi_names(g)) for g in ROI_GROUPS) == len(ROI_CATALOGUE) == len(roi_names())
    for spec in ROI_CATALOGUE.values():
        assert spec.group in ROI_GROUPS
        assert re.fullmatch(r"#[0-9a-fA-F]{6}", spec.colour), spec


def test_unknown_names_and_groups_list_what_exists():
    with pytest.raises(KeyError, match=r"unknown ROI 'V5'; the catalogue has \['V1', 'V2'"):
        roi_spec("V5")
    with pytest.raises(ValueError, match=r"^unknown ROI 'V5'"):
        roi_spec("V5")
    with pytest.raises(ValueError, match=r"'group' must be one of \['early', 'category', 'fine', 'eccentricity'\]"):
        roi_names("visual")


def test_paper_presets():
    for name in PAPER_ROIS:
        assert dict(PAPER_PRESETS[name]) == {name: 1.0}
    for cat in ("faces", "words", "places", "bodies"):
        assert dict(PAPER_PRESETS[f"V1-V4+{cat}"]) == {"V1": 1.0, "V2": 1.0, "V3": 1.0, "V4": 1.0, cat: 1.0}
    for band in roi_names("eccentricity"):
        assert dict(PAPER_PRESETS[band]) == {band: 1.0}
    for weights in PAPER_PRESETS.values():
        assert all(name in ROI_CATALOGUE for name in weights)


def test_mask_from_volumes_intersects_nsdgeneral(rng):
    shape = (5, 6, 4)
    volumes = {f: rng.integers(-1, len(n) + 1, shape) for f, n in NSD_LABELS.items()}
    nsdgeneral = rng.random(shape) < 0.5
    ijk = np.argwhere(nsdgeneral)
    loads = []

    def load(stem):
        loads.append(stem)
        return volumes[stem]

    v1 = roi_mask_from_volumes("V1", load, ijk)
    assert loads == ["prf-visualrois"]
    expected = [volumes["prf-visualrois"][i, j, k] in (1, 2) for i, j, k in ijk]
    assert v1.dtype == bool and v1.tolist() == expected
    faces = roi_mask_from_volumes("faces", load, ijk)
    assert faces.tolist() == [volumes["floc-faces"][i, j, k] > 0 for i, j, k in ijk]
    ecc = roi_mask_from_volumes("ecc4+", load, ijk)
    assert ecc.tolist() == [volumes["prf-eccrois"][i, j, k] == 5 for i, j, k in ijk]

    def missing(stem):
        raise FileNotFoundError(f"{stem}.nii.gz not here")

    with pytest.raises(FileNotFoundError, match="prf-eccrois.nii.gz"):
        roi_mask_from_volumes("ecc1", missing, ijk)
    with pytest.raises(ValueError, match="does not contain the nsdgeneral voxels"):
        roi_mask_from_volumes("V1", lambda s: volumes[s][:2], ijk)


def test_synthetic_pattern_adds_overlaps_and_is_not_zscored():
    masks = {"a": np.array([1, 1, 0, 0], bool), "b": np.array([0, 1, 1, 0], bool)}
    p = synthetic_pattern_from_masks({"a": 1.0, "b": 2.0}, masks.__getitem__, 4)
    assert p.dtype == np.float32 and p.tolist() == [1.0, 3.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="'weights' must name at least one ROI"):
        synthetic_pattern_from_masks({}, masks.__getitem__, 4)
    with pytest.raises(ValueError, match=r"mask of ROI 'a' has shape \(4,\); expected \(5,\)"):
        synthetic_pattern_from_masks({"a": 1.0}, masks.__getitem__, 5)
