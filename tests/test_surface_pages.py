"""The ROI designer and walkthrough surface views in the app (AppTest on the tiny world, which ships NSD's transform
files): the flat map, surface uploads shown next to the pattern (not decoded), wrong meshes refused with a
message, and the voxel-space fallback naming the missing transform files; the page keeps working in each case."""
from __future__ import annotations

import base64
import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("streamlit")

from app_sources import app_errors, make_app_test  # noqa: E402


def _traces(chart) -> list[dict]:
    return json.loads(chart.proto.spec)["data"]


def _array(value) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array {"dtype", "bdata": base64}."""
    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value)


def _mgz(values) -> bytes:
    return gzip.compress(nib.MGHImage(np.asarray(values, np.float32).reshape(-1, 1, 1), np.eye(4)).to_bytes())


def _gii(values) -> bytes:
    return nib.GiftiImage(darrays=[nib.gifti.GiftiDataArray(np.asarray(values, np.float32))]).to_bytes()


def test_surface_then_flat_map_with_outlines_and_hover_values(app):
    app.run()
    assert not app_errors(app), app_errors(app)
    (chart,) = app.get("plotly_chart")
    traces = _traces(chart)
    assert [t.get("name") for t in traces if t["type"] == "mesh3d"][:2] == ["left", "right"]
    assert any(t["type"] == "scatter3d" and t["name"] == "V1" for t in traces)  # the default pattern's ROI
    (left,) = [t for t in traces if t.get("name") == "left"]
    assert left["hovertemplate"] == "left %{customdata[0]}: weight %{customdata[1]:.3~g}<extra></extra>"
    hover = _array(left["customdata"]).reshape(-1, 2)  # [vertex id, value] per vertex, float32
    assert len(hover) == len(_array(left["x"])) and set(np.unique(hover[:, 0])) <= set(range(10242))
    values = hover[:, 1]
    assert np.any(values == 1) and np.any(np.isnan(values))  # the ROI's weight 1, and vertices with no value
    app.radio(key="roi_view").set_value("flat map").run()
    assert not app_errors(app), app_errors(app)
    (chart,) = app.get("plotly_chart")
    spec = json.loads(chart.proto.spec)
    assert spec["layout"]["scene"]["camera"]["projection"]["type"] == "orthographic"
    meshes = [t for t in spec["data"] if t["type"] == "mesh3d" and t.get("name") in ("left", "right")]
    assert len(meshes) == 2 and all(np.all(_array(m["z"]) == 0) for m in meshes)  # flat
    assert any(t["type"] == "scatter3d" and t["name"] == "V1" for t in spec["data"])


def test_surface_upload_is_shown_not_decoded_and_a_wrong_mesh_is_refused(app):
    app.run()
    left = np.linspace(-1, 1, 163842)  # fsaverage
    right = np.linspace(1, -1, 10242)  # fsaverage5
    app.file_uploader(key="roi_upload_surface").set_value(
        [("lh.mine.func.gii", _gii(left), "application/octet-stream"),
         ("rh.mine.mgz", _mgz(right), "application/octet-stream")]).run()
    assert not app_errors(app), app_errors(app)
    charts = app.get("plotly_chart")
    assert len(charts) == 2  # the voxel pattern on the surface, and the uploaded one beside it
    uploaded = {t["name"]: t for t in _traces(charts[1]) if t["type"] == "mesh3d" and t.get("name") in ("left", "right")}
    assert set(uploaded) == {"left", "right"}
    assert any("not decoded" in m.value for m in app.markdown)
    app.file_uploader(key="roi_upload_surface").set_value(
        [("lh.native.mgz", _mgz(np.zeros(227000)), "application/octet-stream")]).run()
    errors = app_errors(app)
    assert len(errors) == 1 and "227,000 vertices" in errors[0] and "fsaverage5 (10,242)" in errors[0]
    assert len(app.get("plotly_chart")) == 1  # the page keeps working: the pattern is still drawn


def test_without_transform_files_the_pattern_falls_back_to_voxel_space(sources, monkeypatch, tmp_path):
    bundle, world, cache = sources
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    transforms = copy / "nsddata" / "ppdata" / "subj01" / "transforms"
    (transforms / "rh.white-to-fsaverage.mgz").unlink()
    for hemi in ("lh", "rh"):  # and the hemisphere files: left/right falls back to the affine, with a warning
        (copy / "nsddata" / "ppdata" / "subj01" / "func1pt8mm" / "roi" / f"{hemi}.nsdgeneral.nii.gz").unlink()
    at = make_app_test((bundle, str(copy), cache), monkeypatch)
    at.run()
    assert not app_errors(at), app_errors(at)
    (info,) = [i.value for i in at.info if "voxel space" in i.value]
    assert "rh.white-to-fsaverage.mgz" in info and "three cortical depths" in info
    (chart,) = at.get("plotly_chart")
    assert [t["type"] for t in _traces(chart)] == ["scatter3d"]  # the voxel scatter
    at.radio(key="roi_hemisphere").set_value("left").run()
    assert not app_errors(at), app_errors(at)
    assert any("lh.nsdgeneral.nii.gz is missing" in w.value and "approximate" in w.value for w in at.warning)
