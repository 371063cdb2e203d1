"""brain_diffuser_core.surface: hemispheres, the voxel -> fsaverage5 projection, ROI outlines and figures.
Each result is checked against a separate, naive computation (loops over voxels, vertices or edges)."""
from __future__ import annotations

import numpy as np
import pytest

from brain_diffuser_core import surface


def _random_map(rng, n_voxels=300, n_vertices=40):
    pattern = rng.normal(size=n_voxels).astype(np.float32)
    vidx = rng.integers(0, n_vertices, n_voxels)
    hemi = rng.choice(["left", "right"], n_voxels)
    return pattern, vidx, hemi


def test_pattern_on_surface_is_the_mean_of_the_voxels_per_vertex(rng):
    pattern, vidx, hemi = _random_map(rng)
    got = surface.pattern_on_surface(pattern, vidx, hemi, n_vertices=40)
    assert set(got) == {"left", "right"}
    for h in ("left", "right"):
        assert got[h].shape == (40,) and got[h].dtype == np.float32
        for v in range(40):
            vals = [float(p) for p, i, hh in zip(pattern, vidx, hemi) if i == v and hh == h]
            assert got[h][v] == pytest.approx(sum(vals) / len(vals) if vals else 0.0, abs=1e-5)


def test_pattern_on_surface_rejects_mismatched_inputs(rng):
    pattern, vidx, hemi = _random_map(rng)
    with pytest.raises(ValueError, match="same length"):
        surface.pattern_on_surface(pattern[:-1], vidx, hemi, n_vertices=40)
    with pytest.raises(ValueError, match=r"must lie in 0\.\.9"):
        surface.pattern_on_surface(pattern, vidx, hemi, n_vertices=10)
    bad = hemi.astype("U6")
    bad[5] = "middle"
    with pytest.raises(ValueError, match="'middle' at index 5"):
        surface.pattern_on_surface(pattern, vidx, bad, n_vertices=40)


def test_restrict_to_hemisphere(rng):
    pattern, _, hemi = _random_map(rng)
    assert surface.restrict_to_hemisphere(pattern, hemi, "both") is pattern
    for h in ("left", "right"):
        out = surface.restrict_to_hemisphere(pattern, hemi, h)
        expected = [p if hh == h else 0.0 for p, hh in zip(pattern, hemi)]
        np.testing.assert_array_equal(out, np.array(expected, np.float32))
    with pytest.raises(ValueError, match="'hemisphere' must be one of"):
        surface.restrict_to_hemisphere(pattern, hemi, "up")


def test_hemisphere_masks_partition_the_voxels(rng):
    _, _, hemi = _random_map(rng)
    masks = surface.hemisphere_masks(hemi)
    assert (masks["left"] ^ masks["right"]).all()
    assert masks["left"].sum() == list(hemi).count("left")


def test_hemispheres_from_affine_matches_nibabel(rng):
    from nibabel.affines import apply_affine

    ijk = rng.integers(0, 80, (200, 3))
    affine = np.array([[-1.8, 0.1, 0, 72.0], [0, 1.8, 0, -100.0], [0, 0, 1.8, -60.0], [0, 0, 0, 1]])
    got = surface.hemispheres_from_affine(ijk, affine)
    x = apply_affine(affine, ijk)[:, 0]
    np.testing.assert_array_equal(got, np.where(x < 0, "left", "right"))
    assert 0 < (got == "left").sum() < len(got)
    with pytest.raises(ValueError, match=r"shape \(n_voxels, 3\)"):
        surface.hemispheres_from_affine(ijk[:, :2], affine)


def _grid_mesh(n=6):
    """A flat n x n grid of vertices, each square split into two triangles; vertex id = row * n + col."""
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a, b, d, e = r * n + c, r * n + c + 1, (r + 1) * n + c, (r + 1) * n + c + 1
            faces += [(a, b, d), (b, e, d)]
    return np.array(faces)


def test_outline_vertices_on_a_grid():
    n = 6
    faces = _grid_mesh(n)
    region = np.zeros(n * n, bool)
    for r in range(1, 5):
        for c in range(1, 4):
            region[r * n + c] = True  # a 4 x 3 block
    got = surface.outline_vertices(region, faces)
    # naive: a region vertex is on the outline when one of its mesh neighbours (edge of a triangle) is outside
    neighbours = {v: set() for v in range(n * n)}
    for f in faces:
        for a in f:
            neighbours[int(a)].update(int(b) for b in f if b != a)
    expected = np.array([region[v] and any(not region[u] for u in neighbours[v]) for v in range(n * n)])
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.sum() < region.sum()  # the block's interior (2 x 1) is not outline
    assert not surface.outline_vertices(np.ones(n * n, bool), faces).any()
    with pytest.raises(ValueError, match=r"shape \(n_faces, 3\)"):
        surface.outline_vertices(region, faces[:, :2])


def test_roi_on_surface_marks_the_rois_vertices(rng):
    _, vidx, hemi = _random_map(rng)
    mask = rng.random(len(vidx)) < 0.2
    got = surface.roi_on_surface(mask, vidx, hemi, n_vertices=40)
    for h in ("left", "right"):
        expected = {int(i) for i, m, hh in zip(vidx, mask, hemi) if m and hh == h}
        assert set(np.flatnonzero(got[h]).tolist()) == expected


def test_load_vertex_map(tmp_path, rng):
    ijk = rng.integers(0, 50, (30, 3))
    vidx = rng.integers(0, 10242, 30)
    hemi = rng.choice(["left", "right"], 30).astype("U5")
    path = surface.vertex_map_path(tmp_path, 2)
    assert path == tmp_path / "world" / "vertex_map_subj02.npz"
    assert surface.load_vertex_map(path) is None  # missing
    path.parent.mkdir(parents=True)
    np.savez(path, voxel_ijk=ijk, vertex_index=vidx.astype(np.int32), hemisphere=hemi)
    vm = surface.load_vertex_map(path, ijk)
    np.testing.assert_array_equal(vm["vertex_index"], vidx)
    assert vm["vertex_index"].dtype == np.int64 and list(vm["hemisphere"]) == list(hemi)
    assert surface.load_vertex_map(path, ijk[::-1]) is None  # other voxels: not this subject's map
    assert surface.load_vertex_map(path, ijk[:-1]) is None


def test_surface_figures_show_the_map_and_roi_outlines(rng):
    mesh, _ = surface.fsaverage5_inflated()
    n = surface.FSAVERAGE5_N_VERTICES
    assert mesh.parts["left"].coordinates.shape == (n, 3)
    maps = {"left": np.zeros(n, np.float32), "right": np.zeros(n, np.float32)}
    maps["left"][:500] = rng.normal(size=500)
    roi = {"left": np.zeros(n, bool), "right": np.zeros(n, bool)}
    roi["left"][:500] = True
    figs = surface.surface_figures(maps, title="t", outlines={"V1": roi})
    assert set(figs) == {"left", "right"}
    left = figs["left"]
    meshes = [t for t in left.data if t.type == "mesh3d" and len(t.x) == n]  # (the colour bar is a tiny mesh)
    outlines = [t for t in left.data if t.type == "scatter3d" and t.name == "V1"]
    assert len(meshes) == 1
    np.testing.assert_allclose(meshes[0].x, mesh.parts["left"].coordinates[:, 0], rtol=1e-5)
    assert len(outlines) == 1
    border = surface.outline_vertices(roi["left"], np.asarray(mesh.parts["left"].faces))
    assert len(outlines[0].x) == border.sum() > 0
    np.testing.assert_allclose(outlines[0].x, np.asarray(mesh.parts["left"].coordinates)[border, 0] * 1.005,
                               rtol=1e-5)
    # the right ROI mask is empty: no outline trace there, and the title names the hemisphere
    assert not [t for t in figs["right"].data if t.type == "scatter3d"]
    assert "(right)" in figs["right"].layout.title.text


def test_voxel_figure_shows_the_nonzero_voxels(rng):
    ijk = rng.integers(0, 20, (50, 3))
    pattern = np.zeros(50, np.float32)
    pattern[[3, 7, 9]] = [1.0, -2.0, 0.5]
    (trace,) = surface.voxel_figure(pattern, ijk, title="x").data
    np.testing.assert_array_equal(trace.x, ijk[[3, 7, 9], 0])
    np.testing.assert_array_equal(trace.marker.color, [1.0, -2.0, 0.5])
    (trace,) = surface.voxel_figure(np.zeros(50), ijk).data  # all zeros: the whole brain in grey scale
    assert len(trace.x) == 50
    with pytest.raises(ValueError, match="same length"):
        surface.voxel_figure(pattern, ijk[:10])


def test_pages_views_reexports_the_library_functions():
    from pages import _views

    for name in ("HEMISPHERES", "pattern_on_surface", "restrict_to_hemisphere", "surface_figures", "voxel_figure"):
        assert getattr(_views, name) is getattr(surface, name)
