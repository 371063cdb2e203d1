"""Voxel patterns on the cortical surface: hemispheres, the voxel -> fsaverage5 vertex map, ROI outlines and
the plotly figure of both hemispheres (:func:`surface_figure`). Plain functions (no streamlit); the app's
pages call them.

Conventions
-----------
* A *pattern* is float (n_voxels,), one value per nsdgeneral voxel of a subject, in the subject's voxel order
  (:class:`brain_diffuser_core.nsd.Subject`); units are whatever the caller's are (z-scores, ROI weights).
* ``hemispheres`` is str (n_voxels,) holding "left" / "right" for each voxel.
* ``vertex_index`` is int (n_voxels,): each voxel's fsaverage5 vertex within its own hemisphere
  (0 .. :data:`FSAVERAGE5_N_VERTICES` - 1). The MiniNSD world writes it to
  ``<root>/world/vertex_map_subjXX.npz`` (:func:`load_vertex_map`); real NSD data have none, and the pages
  fall back to :func:`voxel_figure` (volume index space).
* A *surface map* is {"left", "right": float32 (n_vertices,)}, one value per fsaverage5 vertex.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping

import numpy as np

#: vertices per hemisphere of fsaverage5 (icosahedron order 5)
FSAVERAGE5_N_VERTICES = 10242
HEMIS = ("left", "right")
#: the hemisphere choices of the ROI designer ("both" keeps every voxel)
HEMISPHERES = ("both", "left", "right")


def _check_hemisphere(hemisphere: str) -> None:
    if hemisphere not in HEMISPHERES:
        raise ValueError(f"'hemisphere' must be one of {list(HEMISPHERES)}; {hemisphere!r} was provided")


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{', '.join(lengths)} must have one entry per voxel (the same length); "
                         f"lengths {lengths} were provided")
    return next(iter(lengths.values()))


# ------------------------------------------------------------------------------------------- hemispheres
def hemisphere_masks(hemispheres: np.ndarray) -> dict[str, np.ndarray]:
    """{"left", "right": bool (n_voxels,)} from str (n_voxels,) labels; raises on any other label."""
    hemispheres = np.asarray(hemispheres).astype(str)
    bad = ~np.isin(hemispheres, HEMIS)
    if bad.any():
        raise ValueError(f"hemisphere labels must be 'left' or 'right'; {int(bad.sum())} other value(s) were "
                         f"found, e.g. {str(hemispheres[bad][0])!r} at index {int(np.flatnonzero(bad)[0])}")
    return {h: hemispheres == h for h in HEMIS}


def hemispheres_from_affine(voxel_ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """str (n_voxels,) "left"/"right" from the sign of each voxel's x in RAS mm (x < 0: left).

    voxel_ijk : int (n_voxels, 3) volume indices; affine : (4, 4) voxel -> RAS mm.
    """
    ijk = np.asarray(voxel_ijk, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    if ijk.ndim != 2 or ijk.shape[1] != 3:
        raise ValueError(f"'voxel_ijk' must have shape (n_voxels, 3); shape {ijk.shape} was provided")
    if affine.shape != (4, 4):
        raise ValueError(f"'affine' must have shape (4, 4); shape {affine.shape} was provided")
    x = ijk @ affine[0, :3] + affine[0, 3]
    return np.where(x < 0, "left", "right")


def restrict_to_hemisphere(pattern: np.ndarray, hemispheres: np.ndarray, hemisphere: str) -> np.ndarray:
    """Zero the pattern outside ``hemisphere`` ("both" returns it unchanged); shapes (n_voxels,), float32."""
    _check_hemisphere(hemisphere)
    if hemisphere == "both":
        return pattern
    _check_same_length(pattern=pattern, hemispheres=hemispheres)
    return np.where(np.asarray(hemispheres) == hemisphere, pattern, 0).astype(np.float32)


# ------------------------------------------------------------------------------------------- vertex map
def load_vertex_map(path: str | Path, voxel_ijk: np.ndarray | None = None) -> dict | None:
    """Read a world's ``vertex_map_subjXX.npz``; None when the file is missing or its voxels differ.

    Returns {"vertex_index": int64 (n_voxels,), "hemisphere": str (n_voxels,)} in the file's voxel order.
    When ``voxel_ijk`` (int (n_voxels, 3), the subject's voxels) is given, the file's voxels must equal it
    row for row, else None (the map belongs to other data).
    """
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        ijk, vidx, hemi = z["voxel_ijk"], z["vertex_index"], z["hemisphere"]
    if voxel_ijk is not None:
        voxel_ijk = np.asarray(voxel_ijk)
        if ijk.shape != voxel_ijk.shape or not np.array_equal(ijk, voxel_ijk):
            return None
    return {"vertex_index": vidx.astype(np.int64), "hemisphere": hemi.astype(str)}


def vertex_map_path(nsd_root: str | Path, subject: int) -> Path:
    """Where a MiniNSD world keeps subject's voxel -> vertex map: ``<root>/world/vertex_map_subjXX.npz``."""
    return Path(nsd_root) / "world" / f"vertex_map_subj{int(subject):02d}.npz"


def pattern_on_surface(pattern: np.ndarray, vertex_index: np.ndarray, hemispheres: np.ndarray,
                       n_vertices: int = FSAVERAGE5_N_VERTICES) -> dict[str, np.ndarray]:
    """Voxel pattern (n_voxels,) -> {"left", "right": float32 (n_vertices,)}: mean of the voxels per vertex.

    Vertices no voxel maps to get 0. ``vertex_index`` int (n_voxels,) in 0 .. n_vertices - 1.
    """
    pattern = np.asarray(pattern, dtype=np.float64)
    vertex_index = np.asarray(vertex_index)
    _check_same_length(pattern=pattern, vertex_index=vertex_index, hemispheres=hemispheres)
    if vertex_index.size and (vertex_index.min() < 0 or vertex_index.max() >= n_vertices):
        raise ValueError(f"'vertex_index' must lie in 0..{n_vertices - 1}; values "
                         f"{int(vertex_index.min())}..{int(vertex_index.max())} were provided")
    out = {}
    for hemi, sel in hemisphere_masks(hemispheres).items():
        total = np.bincount(vertex_index[sel], weights=pattern[sel], minlength=n_vertices)
        count = np.bincount(vertex_index[sel], minlength=n_vertices)
        out[hemi] = (total / np.maximum(count, 1)).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------- ROI outlines
def roi_on_surface(voxel_mask: np.ndarray, vertex_index: np.ndarray, hemispheres: np.ndarray,
                   n_vertices: int = FSAVERAGE5_N_VERTICES) -> dict[str, np.ndarray]:
    """{"left", "right": bool (n_vertices,)}: the vertices holding at least one voxel of an ROI.

    voxel_mask : bool (n_voxels,), the ROI's voxels (``Subject.roi_mask(name)``).
    """
    voxel_mask = np.asarray(voxel_mask, dtype=bool)
    _check_same_length(voxel_mask=voxel_mask, vertex_index=vertex_index, hemispheres=hemispheres)
    vertex_index = np.asarray(vertex_index)
    out = {}
    for hemi, sel in hemisphere_masks(hemispheres).items():
        m = np.zeros(n_vertices, bool)
        m[vertex_index[sel & voxel_mask]] = True
        out[hemi] = m
    return out


def outline_vertices(vertex_mask: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """bool (n_vertices,): the vertices of a region that share a mesh triangle with a vertex outside it.

    vertex_mask : bool (n_vertices,); faces : int (n_faces, 3) triangles of the mesh.
    """
    vertex_mask = np.asarray(vertex_mask, dtype=bool)
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"'faces' must have shape (n_faces, 3); shape {faces.shape} was provided")
    inside = vertex_mask[faces]  # (n_faces, 3)
    mixed = inside.any(axis=1) & ~inside.all(axis=1)
    out = np.zeros_like(vertex_mask)
    out[faces[mixed][inside[mixed]]] = True
    return out


# ------------------------------------------------------------------------------------------- figures
@functools.lru_cache(maxsize=1)
def fsaverage5_inflated():
    """(inflated mesh, sulcal depth) of fsaverage5 from nilearn's bundled files (offline), loaded once.

    Returns nilearn ``PolyMesh`` objects: ``mesh.parts[hemi].coordinates`` (10242, 3) mm and ``.faces``
    (20480, 3); ``sulc.data.parts[hemi]`` (10242,).
    """
    from nilearn import datasets

    mesh = datasets.load_fsaverage("fsaverage5")["inflated"]
    sulc = datasets.load_fsaverage_data(mesh="fsaverage5", mesh_type="inflated", data_type="sulcal")
    return mesh, sulc


#: margin (mm, inflated y) added to the most anterior vertex of the widest possible MiniNSD patch for the cut
VISUAL_CUT_MARGIN_MM = 3.0
#: the figure regions: "visual" crops each hemisphere to its posterior part, "whole" keeps the full mesh
REGIONS = ("visual", "whole")
#: gap (mm) between the two hemispheres of :func:`surface_figure`
HEMISPHERE_GAP_MM = 12.0
#: camera of :func:`surface_figure`: behind (-y) and below (-z) the occipital poles, looking up and forward
OCCIPITAL_CAMERA = dict(eye=dict(x=0.0, y=-1.55, z=-0.85), up=dict(x=0.0, y=0.0, z=1.0),
                        center=dict(x=0.0, y=0.0, z=-0.1))


@functools.lru_cache(maxsize=1)
def visual_y_cut() -> dict[str, float]:
    """{"left", "right": y cut (mm on the inflated fsaverage5 surface)} of the "visual" region.

    From the data: the MiniNSD world (:mod:`brain_diffuser_core.world.observer`) takes each subject's voxel patch
    as the pial vertices inside a box set whose bounds are jittered by at most +2 mm; all bounds are upper
    bounds, so the patch at jitter +2 everywhere holds every subject's (and every seed's) patch. The cut is the
    largest inflated y of that widest patch plus :data:`VISUAL_CUT_MARGIN_MM` (about -4 mm: some 50 % of the
    triangles are kept, the occipital lobe plus the ventral temporal surface of the category areas).
    """
    from brain_diffuser_core.world import observer

    mesh, _ = fsaverage5_inflated()
    pial = observer._fsaverage5()
    cut = {}
    for hemi in HEMIS:
        widest = observer._patch_mask(pial[hemi], np.full(5, 2.0))
        y = np.asarray(mesh.parts[hemi].coordinates)[:, 1]
        cut[hemi] = float(y[widest].max()) + VISUAL_CUT_MARGIN_MM
    return cut


def crop_mesh(coords: np.ndarray, faces: np.ndarray, y_cut: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The part of a mesh posterior to ``y_cut``: the vertices with y < y_cut and the faces all of whose vertices are.

    coords : float (n_vertices, 3) mm; faces : int (n_faces, 3). Returns (kept, new_coords, new_faces): kept is
    int (n_kept,) the original indices of the kept vertices (increasing), new_coords (n_kept, 3) = coords[kept],
    new_faces int (n_kept_faces, 3) indexing new_coords.
    """
    coords, faces = np.asarray(coords), np.asarray(faces)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"'coords' must have shape (n_vertices, 3); shape {coords.shape} was provided")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"'faces' must have shape (n_faces, 3); shape {faces.shape} was provided")
    inside = coords[:, 1] < y_cut
    kept = np.flatnonzero(inside)
    new_index = np.full(len(coords), -1, np.int64)
    new_index[kept] = np.arange(len(kept))
    face_kept = inside[faces].all(axis=1)
    return kept, coords[kept], new_index[faces[face_kept]]


@functools.lru_cache(maxsize=16)
def _nilearn_colours(hemi: str, values_bytes: bytes, vmax: float):
    """(vertex colours str (10242,) "#rrggbb", colour-bar Mesh3d as a dict or None): what nilearn's plotly
    ``plot_surf`` gives a hemisphere's map (float32 (10242,) as bytes), sulcal background, symmetric range +-vmax.

    Cached: a page rerun with the same pattern (every page switch back to it) skips nilearn (~0.1 s a hemisphere).
    """
    from nilearn import plotting

    mesh, sulc = fsaverage5_inflated()
    values = np.frombuffer(values_bytes, dtype=np.float32)
    active = float(np.abs(values).max()) > 1e-6
    disp = plotting.plot_surf(mesh.parts[hemi], surf_map=values, bg_map=sulc.data.parts[hemi], hemi=hemi,
                              engine="plotly", cmap="RdBu_r", symmetric_cmap=True, vmax=vmax, colorbar=True,
                              threshold=1e-6 if active else None)
    traces = list(disp.figure.data)
    main = next(t for t in traces if t.type == "mesh3d" and t.x is not None and len(t.x) == len(values))
    bar = next((t.to_plotly_json() for t in traces if t is not main and t.type == "mesh3d"), None)
    colours = np.asarray(main.vertexcolor)
    colours.flags.writeable = False  # shared by the cache
    return colours, bar


def surface_figure(surface_maps: Mapping[str, np.ndarray], title: str = "",
                   outlines: Mapping[str, Mapping[str, np.ndarray]] | None = None, region: str = "visual"):
    """ONE plotly figure of per-vertex maps on the fsaverage5 inflated surface, hemispheres side by side.

    surface_maps : {"left"/"right": float (10242,)} (see :func:`pattern_on_surface`), one or both hemispheres;
        one shared symmetric colour range (RdBu_r), vertices with |value| <= 1e-6 show the sulcal background.
        The vertex colours are nilearn's (``plot_surf(engine="plotly")``: its mesh trace per hemisphere, merged).
    outlines : optional {roi name: {"left"/"right": bool (10242,)}} (see :func:`roi_on_surface`); each ROI's
        border (:func:`outline_vertices`) is one black marker trace named after the ROI (both hemispheres).
    region : "visual" (default) crops each hemisphere to its vertices posterior to :func:`visual_y_cut` (half the
        triangles, every MiniNSD patch vertex kept); "whole" keeps the full meshes.

    The left hemisphere is shifted to x <= -gap/2 and the right one to x >= +gap/2 (gap
    :data:`HEMISPHERE_GAP_MM`), so they never overlap; the camera (:data:`OCCIPITAL_CAMERA`) looks at the
    occipital poles from behind and below (V1-V4 and the ventral category areas in view). Trace order: one
    mesh3d per hemisphere (name "left"/"right"), nilearn's colour bar (a 1-triangle invisible mesh3d), then
    the outline scatter3d traces.
    """
    import plotly.graph_objects as go

    if region not in REGIONS:
        raise ValueError(f"'region' must be one of {list(REGIONS)}; {region!r} was provided")
    hemis = [h for h in HEMIS if h in surface_maps]
    unknown = sorted(set(surface_maps) - set(HEMIS))
    if unknown or not hemis:
        raise ValueError(f"'surface_maps' must have keys among {list(HEMIS)} (at least one); keys "
                         f"{sorted(surface_maps)} were provided")
    mesh, sulc = fsaverage5_inflated()
    for hemi in hemis:
        if np.shape(surface_maps[hemi]) != (FSAVERAGE5_N_VERTICES,):
            raise ValueError(f"surface_maps[{hemi!r}] must have shape ({FSAVERAGE5_N_VERTICES},); shape "
                             f"{np.shape(surface_maps[hemi])} was provided")
    vmax = max(float(np.abs(surface_maps[h]).max()) for h in hemis) or 1.0
    cut = visual_y_cut() if region == "visual" else None
    fig = go.Figure()
    colorbar = None
    placed = {}  # hemi -> (kept vertex ids, shifted coords of all vertices)
    for hemi in hemis:
        values = np.ascontiguousarray(surface_maps[hemi], dtype=np.float32)
        vertexcolor, bar = _nilearn_colours(hemi, values.tobytes(), vmax)
        if colorbar is None:
            colorbar = bar
        part = mesh.parts[hemi]
        coords, faces = np.asarray(part.coordinates, np.float64), np.asarray(part.faces)
        if cut is None:
            kept, sub_coords, sub_faces = np.arange(len(coords)), coords, faces
        else:
            kept, sub_coords, sub_faces = crop_mesh(coords, faces, cut[hemi])
        dx = (-HEMISPHERE_GAP_MM / 2 - coords[kept, 0].max() if hemi == "left"
              else HEMISPHERE_GAP_MM / 2 - coords[kept, 0].min())
        shifted = coords + np.array([dx, 0.0, 0.0])
        placed[hemi] = (kept, shifted)
        colours = vertexcolor[kept].tolist()
        fig.add_trace(go.Mesh3d(x=shifted[kept, 0].astype(np.float32), y=sub_coords[:, 1].astype(np.float32),
                                z=sub_coords[:, 2].astype(np.float32), i=sub_faces[:, 0].astype(np.int32),
                                j=sub_faces[:, 1].astype(np.int32), k=sub_faces[:, 2].astype(np.int32),
                                vertexcolor=colours, name=hemi, hoverinfo="name", showscale=False))
    if colorbar is not None:
        fig.add_trace(go.Mesh3d(colorbar))
    for name, masks in (outlines or {}).items():
        xyz = []
        for hemi in hemis:
            if hemi not in masks:
                continue
            kept, shifted = placed[hemi]
            faces = np.asarray(mesh.parts[hemi].faces)
            border = outline_vertices(masks[hemi], faces)
            border_kept = np.zeros_like(border)
            border_kept[kept] = border[kept]
            coords = np.asarray(mesh.parts[hemi].coordinates, np.float64)
            # just outside the surface (1.005 x the unshifted position), so the markers are not hidden by it
            xyz.append(coords[border_kept] * 1.005 + (shifted[0] - coords[0]))
        xyz = np.concatenate(xyz) if xyz else np.zeros((0, 3))
        if not len(xyz):
            continue
        fig.add_trace(go.Scatter3d(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], mode="markers", name=name,
                                   marker=dict(size=1.5, color="black"), hoverinfo="name"))
    axis = dict(visible=False, showbackground=False)
    fig.update_layout(title=dict(text=title) if title else None, height=380, margin=dict(l=0, r=0, t=30, b=0),
                      showlegend=False,
                      scene=dict(xaxis=axis, yaxis=axis, zaxis=axis, aspectmode="data", camera=OCCIPITAL_CAMERA))
    return fig


def voxel_figure(pattern: np.ndarray, voxel_ijk: np.ndarray, title: str = ""):
    """plotly 3-D scatter of the non-zero voxels of a pattern (n_voxels,) in volume index space (i, j, k).

    An all-zero pattern shows every voxel (so the brain's shape is still visible).
    """
    import plotly.graph_objects as go

    pattern = np.asarray(pattern)
    _check_same_length(pattern=pattern, voxel_ijk=voxel_ijk)
    nz = np.flatnonzero(pattern)
    shown = nz if len(nz) else np.arange(len(pattern))
    ijk = np.asarray(voxel_ijk)[shown]
    fig = go.Figure(go.Scatter3d(x=ijk[:, 0], y=ijk[:, 1], z=ijk[:, 2], mode="markers",
                                 marker=dict(size=2, color=pattern[shown], colorscale="RdBu_r", cmid=0,
                                             colorbar=dict(title="weight"))))
    fig.update_layout(title=title, height=420, margin=dict(l=0, r=0, t=30, b=0),
                      scene=dict(xaxis_title="i", yaxis_title="j", zaxis_title="k"))
    return fig
