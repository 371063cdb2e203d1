"""brain_diffuser_core.surface: hemispheres, ROI outlines and the surface, flat and voxel figures.
Each result is checked against a separate, naive computation (loops over voxels, vertices or edges)."""
from __future__ import annotations

import numpy as np
import pytest

from brain_diffuser_core import surface


def _random_map(rng, n_voxels=300):
    pattern = rng.normal(size=n_voxels).astype(np.float32)
    hemi = rng.choice(["left", "right"], n_voxels)
    return pattern, hemi


def test_restrict_to_hemisphere(rng):
    pattern, hemi = _random_map(rng)
    assert surface.restrict_to_hemisphere(pattern, hemi, "both") is pattern
    for h in ("left", "right"):
        out = surface.restrict_to_hemisphere(pattern, hemi, h)
        expected = [p if hh == h else 0.0 for p, hh in zip(pattern, hemi)]
        np.testing.assert_array_equal(out, np.array(expected, np.float32))
    with pytest.raises(ValueError, match="'hemisphere' must be one of"):
        surface.restrict_to_hemisphere(pattern, hemi, "up")


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


def _rgb(colour: str) -> tuple[int, int, int]:
    assert colour.startswith("#") and len(colour) == 7, colour
    return tuple(int(colour[k:k + 2], 16) for k in (1, 3, 5))


def _placement(trace, coords):
    """Original vertex id of each vertex of a figure's mesh trace (matched on its unshifted y, z) and the x shift."""
    index = {(float(np.float32(y)), float(np.float32(z))): v for v, (_, y, z) in enumerate(coords)}
    ids = np.array([index[(float(y), float(z))] for y, z in zip(trace.y, trace.z)])
    shift = np.asarray(trace.x, np.float64) - coords[ids, 0]
    np.testing.assert_allclose(shift, shift[0], atol=1e-3)  # a pure translation in x
    return ids, float(shift[0])


def _meshes(fig):
    return {t.name: t for t in fig.data if t.type == "mesh3d" and t.name in ("left", "right")}


def _hover(trace) -> list[str]:
    """The hover line of each vertex of a mesh trace, as plotly.js writes it from the trace's hovertemplate and
    customdata ([vertex id, value]): a naive re-implementation of the two placeholders it uses."""
    template = trace.hovertemplate
    assert template.endswith("<extra></extra>") and "%{customdata[0]}" in template, template
    head, tail = template.removesuffix("<extra></extra>").split("%{customdata[1]:.3~g}")
    out = []
    for vertex, value in np.asarray(trace.customdata, np.float64):
        assert vertex == int(vertex)
        shown = "NaN" if np.isnan(value) else f"{value:.3g}"  # d3's ".3~g": 3 significant digits, no trailing 0
        out.append(head.replace("%{customdata[0]}", str(int(vertex))) + shown + tail)
    return out


def test_crop_mesh_against_a_naive_loop(rng):
    coords = rng.normal(size=(60, 3))
    faces = np.array([rng.choice(60, 3, replace=False) for _ in range(150)])
    kept, sub_coords, sub_faces = surface.crop_mesh(coords, faces, 0.3)
    assert kept.tolist() == [v for v in range(60) if coords[v, 1] < 0.3]
    np.testing.assert_array_equal(sub_coords, coords[kept])
    expected = [tuple(f) for f in faces if all(coords[v, 1] < 0.3 for v in f)]
    assert sub_faces.min() >= 0 and sub_faces.max() < len(kept)  # no face refers to a dropped vertex
    assert [tuple(kept[f]) for f in sub_faces] == expected
    with pytest.raises(ValueError, match="faces"):
        surface.crop_mesh(coords, faces[:, :2], 0.0)


def test_visual_cut_keeps_every_patch_vertex_of_the_world():
    """Every vertex any MiniNSD voxel maps to (all subjects, two world seeds) lies before the cut, so the
    cropped mesh keeps it, with the triangles around it; and the crop really drops about half the mesh."""
    from brain_diffuser_core.config import PAPER
    from brain_diffuser_core.world.observer import Observer

    mesh, _ = surface.fsaverage5_inflated()
    cut = surface.visual_y_cut()
    observers = [Observer(s) for s in PAPER.nsd.subjects] + [Observer(PAPER.nsd.subjects[0], seed=7)]
    for hemi in ("left", "right"):
        coords, faces = np.asarray(mesh.parts[hemi].coordinates), np.asarray(mesh.parts[hemi].faces)
        kept, _, sub_faces = surface.crop_mesh(coords, faces, cut[hemi])
        patch = np.unique(np.concatenate([o.vertex_ids[hemi] for o in observers]))
        assert len(patch) > 1000 and np.isin(patch, kept).all()
        # every triangle touching only patch vertices survives the crop
        patch_faces = {tuple(f) for f in faces if np.isin(f, patch).all()}
        assert patch_faces <= {tuple(kept[f]) for f in sub_faces}
        assert 0.3 < len(sub_faces) / len(faces) < 0.7


def test_surface_figure_puts_the_values_on_their_vertices(rng):
    mesh, _ = surface.fsaverage5_inflated()
    n = surface.FSAVERAGE5_N_VERTICES
    cut = surface.visual_y_cut()
    maps, pos, neg = {}, {}, {}
    for hemi in ("left", "right"):
        y = np.asarray(mesh.parts[hemi].coordinates)[:, 1]
        posterior = rng.permutation(np.flatnonzero(y < cut[hemi] - 10))
        pos[hemi], neg[hemi] = posterior[:40], posterior[40:80]
        maps[hemi] = np.zeros(n, np.float32)
        maps[hemi][pos[hemi]] = 2.0
        maps[hemi][neg[hemi]] = -2.0
    fig = surface.surface_figure(maps, title="t")
    meshes = _meshes(fig)
    assert set(meshes) == {"left", "right"}
    shifts = {}
    for hemi, trace in meshes.items():
        coords = np.asarray(mesh.parts[hemi].coordinates)
        ids, shifts[hemi] = _placement(trace, coords)
        assert (coords[ids, 1] < cut[hemi]).all()  # cropped to the posterior part
        assert np.isin(pos[hemi], ids).all() and np.isin(neg[hemi], ids).all()
        faces = np.stack([trace.i, trace.j, trace.k], axis=1)
        assert faces.min() >= 0 and faces.max() < len(ids)
        # the hover data: each vertex's own id and value, binary (no per-vertex hover strings)
        hover = np.asarray(trace.customdata)
        assert hover.dtype == np.float32 and trace.text is None
        np.testing.assert_array_equal(hover[:, 0], ids)
        np.testing.assert_array_equal(hover[:, 1], maps[hemi][ids])
        colours = {int(v): _rgb(c) for v, c in zip(ids, trace.vertexcolor)}
        for v in pos[hemi]:
            r, g, b = colours[int(v)]
            assert r > b + 60, (hemi, v, colours[int(v)])  # red: positive
        for v in neg[hemi]:
            r, g, b = colours[int(v)]
            assert b > r + 60, (hemi, v, colours[int(v)])  # blue: negative
        zero = np.setdiff1d(ids, np.concatenate([pos[hemi], neg[hemi]]))[:200]
        assert all(len(set(colours[int(v)])) == 1 for v in zero)  # grey sulcal background
    # side by side, not overlapping: left hemisphere entirely at x < 0 < right hemisphere
    assert max(meshes["left"].x) < 0 < min(meshes["right"].x)
    assert min(meshes["right"].x) - max(meshes["left"].x) == pytest.approx(surface.HEMISPHERE_GAP_MM, abs=1e-3)
    assert fig.layout.title.text == "t"
    assert fig.layout.scene.camera.eye.y < 0 and fig.layout.scene.camera.eye.z < 0  # behind and below


def test_surface_figure_whole_region_and_one_hemisphere():
    mesh, _ = surface.fsaverage5_inflated()
    n = surface.FSAVERAGE5_N_VERTICES
    fig = surface.surface_figure({"right": np.linspace(-1, 1, n, dtype=np.float32)}, region="whole")
    meshes = _meshes(fig)
    assert set(meshes) == {"right"}
    assert len(meshes["right"].x) == n and len(meshes["right"].i) == len(mesh.parts["right"].faces)
    assert min(meshes["right"].x) == pytest.approx(surface.HEMISPHERE_GAP_MM / 2, abs=1e-3)
    visual = _meshes(surface.surface_figure({"right": np.zeros(n, np.float32)}))["right"]
    assert len(visual.i) < 0.7 * len(mesh.parts["right"].faces)
    with pytest.raises(ValueError, match="region"):
        surface.surface_figure({"right": np.zeros(n)}, region="occipital")
    with pytest.raises(ValueError, match="surface_maps"):
        surface.surface_figure({"lh": np.zeros(n)})
    with pytest.raises(ValueError, match=r"surface_maps\['left'\]"):
        surface.surface_figure({"left": np.zeros(n - 1)})


def test_surface_figure_draws_roi_outlines():
    mesh, _ = surface.fsaverage5_inflated()
    n = surface.FSAVERAGE5_N_VERTICES
    cut = surface.visual_y_cut()
    coords = {h: np.asarray(mesh.parts[h].coordinates) for h in ("left", "right")}
    maps = {h: np.zeros(n, np.float32) for h in ("left", "right")}
    # V1: a posterior disc in the left hemisphere; "empty": no vertex at all (no trace)
    pole = coords["left"][np.argmin(coords["left"][:, 1])]
    roi = {"left": np.linalg.norm(coords["left"] - pole, axis=1) < 15, "right": np.zeros(n, bool)}
    fig = surface.surface_figure(maps, outlines={"V1": roi, "empty": {h: np.zeros(n, bool) for h in maps}})
    outlines = [t for t in fig.data if t.type == "scatter3d"]
    assert [t.name for t in outlines] == ["V1"]
    _, shift = _placement(_meshes(fig)["left"], coords["left"])
    border = surface.outline_vertices(roi["left"], np.asarray(mesh.parts["left"].faces))
    assert border.sum() > 10 and (coords["left"][border, 1] < cut["left"]).all()
    expected = coords["left"][border] * 1.005
    np.testing.assert_allclose(outlines[0].x, expected[:, 0] + shift, atol=1e-3)
    np.testing.assert_allclose(outlines[0].y, expected[:, 1], atol=1e-3)
    np.testing.assert_allclose(outlines[0].z, expected[:, 2], atol=1e-3)


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

    for name in ("HEMISPHERES", "restrict_to_hemisphere", "surface_figure", "flat_figure", "voxel_figure"):
        assert getattr(_views, name) is getattr(surface, name)


def test_surface_figure_no_value_vertices_show_the_background_and_say_so_on_hover():
    mesh, _ = surface.fsaverage5_inflated()
    n = surface.FSAVERAGE5_N_VERTICES
    values = np.full(n, np.nan, np.float32)
    y = np.asarray(mesh.parts["left"].coordinates)[:, 1]
    posterior = np.flatnonzero(y < surface.visual_y_cut()["left"] - 10)
    values[posterior[:30]] = 1.5
    trace = _meshes(surface.surface_figure({"left": values}, value_label="weight"))["left"]
    ids, _ = _placement(trace, np.asarray(mesh.parts["left"].coordinates))
    text = dict(zip(ids.tolist(), _hover(trace)))
    colours = dict(zip(ids.tolist(), trace.vertexcolor))
    assert text[int(posterior[0])] == f"left {int(posterior[0])}: weight 1.5"
    assert _rgb(colours[int(posterior[0])])[0] > _rgb(colours[int(posterior[0])])[2] + 60  # red
    empty = int(posterior[100])
    assert text[empty] == f"left {empty}: weight NaN"  # no value (coverage < 0.5)
    assert len(set(_rgb(colours[empty]))) == 1  # grey background, not a colour of the scale
    # all NaN: still a figure (the sulcal background only)
    assert _meshes(surface.surface_figure({"left": np.full(n, np.nan, np.float32)}))["left"].vertexcolor


def test_flat_figure_lays_the_visual_cortex_flat_with_outlines():
    flat = surface.fsaverage5_flat()
    inflated, _ = surface.fsaverage5_inflated()
    n = surface.FSAVERAGE5_N_VERTICES
    cut = surface.visual_y_cut()
    maps = {h: np.zeros(n, np.float32) for h in ("left", "right")}
    y_infl = np.asarray(inflated.parts["left"].coordinates)[:, 1]
    in_face = np.zeros(n, bool)
    in_face[np.asarray(flat.parts["left"].faces).ravel()] = True
    target = int(np.flatnonzero((y_infl < cut["left"] - 10) & in_face)[0])
    maps["left"][target] = -1.0
    roi = {"left": np.linalg.norm(np.asarray(inflated.parts["left"].coordinates)
                                  - inflated.parts["left"].coordinates[target], axis=1) < 12,
           "right": np.zeros(n, bool)}
    fig = surface.flat_figure(maps, title="flat", outlines={"V1": roi})
    meshes = _meshes(fig)
    assert set(meshes) == {"left", "right"}
    assert np.all(np.asarray(meshes["left"].z) == 0)  # flat
    assert max(meshes["left"].x) < 0 < min(meshes["right"].x)
    coords = np.asarray(flat.parts["left"].coordinates)
    # the kept vertices: posterior (inflated y < cut) and in a flat face (the medial wall is left out), matched
    # on the flat (x, y) they keep (x shifted)
    expected = np.flatnonzero((y_infl < cut["left"]) & in_face)
    assert len(meshes["left"].x) == len(expected)
    np.testing.assert_allclose(meshes["left"].y, coords[expected, 1], atol=1e-3)
    shift = np.asarray(meshes["left"].x) - coords[expected, 0]
    np.testing.assert_allclose(shift, shift[0], atol=1e-3)
    where = int(np.flatnonzero(expected == target)[0])
    assert _hover(meshes["left"])[where] == f"left {target}: value -1"
    r, g, b = _rgb(meshes["left"].vertexcolor[where])
    assert b > r + 60  # blue: negative
    (outline,) = [t for t in fig.data if t.type == "scatter3d"]
    border = surface.outline_vertices(roi["left"], np.asarray(flat.parts["left"].faces))
    border &= (y_infl < cut["left"]) & in_face
    assert outline.name == "V1" and len(outline.x) == border.sum() > 5
    np.testing.assert_allclose(outline.y, coords[border, 1], atol=1e-3)
    assert np.all(np.asarray(outline.z) > 0)  # above the map
    assert fig.layout.scene.camera.projection.type == "orthographic"
