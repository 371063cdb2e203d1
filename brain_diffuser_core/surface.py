"""Voxel patterns on the cortical surface, drawn: the plotly figures of both hemispheres on the inflated
fsaverage5 surface (:func:`surface_figure`) and on its flat map (:func:`flat_figure`), ROI outlines, and the
voxel-space fallback (:func:`voxel_figure`). Plain functions (no streamlit); the app's pages call them.

Conventions
-----------
* A *pattern* is float (n_voxels,), one value per nsdgeneral voxel of a subject, in the subject's voxel order
  (:class:`brain_diffuser_core.nsd.Subject`); units are whatever the caller's are (z-scores, ROI weights).
* ``hemispheres`` is str (n_voxels,) holding "left" / "right" for each voxel
  (:func:`brain_diffuser_core.nsd_surface.hemispheres_from_nsdgeneral`).
* A *surface map* is {"left", "right": float32 (10242,)}, one value per fsaverage5 vertex, NaN where the vertex
  has no value (coverage < 0.5): :meth:`brain_diffuser_core.nsd_surface.SurfaceMap.project` makes them from
  NSD's transforms (real subjects and the MiniNSD world alike).
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
def hemispheres_from_affine(voxel_ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """str (n_voxels,) "left"/"right" from the sign of each voxel's x in RAS mm (x < 0: left).

    Only a last resort when ``roi/{lh,rh}.nsdgeneral.nii.gz`` are missing: NSD's func1pt8mm affine is nominal
    (slab-centred), so on real data this rule cuts in the wrong place (use
    :func:`brain_diffuser_core.nsd_surface.hemispheres_from_nsdgeneral`).

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


# ------------------------------------------------------------------------------------------- ROI outlines
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
    kept, new_faces = _sub_mesh(coords[:, 1] < y_cut, faces)
    return kept, coords[kept], new_faces


def _sub_mesh(keep: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept int (n_kept,) increasing, faces int (n_kept_faces, 3) re-indexed): the faces all of whose vertices
    are kept (``keep`` bool (n_vertices,))."""
    kept = np.flatnonzero(keep)
    new_index = np.full(len(keep), -1, np.int64)
    new_index[kept] = np.arange(len(kept))
    return kept, new_index[faces[keep[faces].all(axis=1)]]


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


#: camera of :func:`flat_figure`: straight above the flat map, orthographic (a 2-D view of the 3-D scene)
FLAT_CAMERA = dict(eye=dict(x=0.0, y=0.0, z=1.0), up=dict(x=0.0, y=1.0, z=0.0), center=dict(x=0.0, y=0.0, z=0.0),
                   projection=dict(type="orthographic"))


#: flat map scene size (plotly aspect-ratio units of the map's width) that fills a 380-px-high chart, and the
#: height / width ratio beyond which the map is scaled to its height instead
FLAT_SCALE = 2.6
FLAT_HEIGHT_RATIO = 0.8


@functools.lru_cache(maxsize=1)
def fsaverage5_flat():
    """nilearn's bundled fsaverage5 flat mesh (``PolyMesh``; same vertex order as the inflated one; the medial
    wall's vertices are in no face), loaded once."""
    from nilearn import datasets

    return datasets.load_fsaverage("fsaverage5")["flat"]


def _check_maps(surface_maps: Mapping[str, np.ndarray]) -> list[str]:
    hemis = [h for h in HEMIS if h in surface_maps]
    unknown = sorted(set(surface_maps) - set(HEMIS))
    if unknown or not hemis:
        raise ValueError(f"'surface_maps' must have keys among {list(HEMIS)} (at least one); keys "
                         f"{sorted(surface_maps)} were provided")
    for hemi in hemis:
        if np.shape(surface_maps[hemi]) != (FSAVERAGE5_N_VERTICES,):
            raise ValueError(f"surface_maps[{hemi!r}] must have shape ({FSAVERAGE5_N_VERTICES},); shape "
                             f"{np.shape(surface_maps[hemi])} was provided")
    return hemis


def _hover_data(values: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """float32 (n_kept, 2): [fsaverage5 vertex id, value (NaN = no value)] per kept vertex, for the hover.

    One binary (base64) array instead of one hover string per vertex: about a third of the bytes, and plotly.py
    validates it in milliseconds (a list of strings takes it ~0.1 s). Ids < 2**24 are exact in float32.
    """
    return np.column_stack([kept, values[kept]]).astype(np.float32)


def _hover_template(hemi: str, value_label: str) -> str:
    """"left 1234: weight 0.52" (3 significant digits) from :func:`_hover_data`; NaN where there is no value."""
    return f"{hemi} %{{customdata[0]}}: {value_label} %{{customdata[1]:.3~g}}<extra></extra>"


def _hemispheres_figure(surface_maps, title, outlines, region, flat: bool, value_label: str):
    """The shared body of :func:`surface_figure` (inflated, 3-D) and :func:`flat_figure` (flat map)."""
    import plotly.graph_objects as go

    if region not in REGIONS:
        raise ValueError(f"'region' must be one of {list(REGIONS)}; {region!r} was provided")
    hemis = _check_maps(surface_maps)
    inflated, _ = fsaverage5_inflated()
    mesh = fsaverage5_flat() if flat else inflated
    finite = [np.abs(surface_maps[h])[np.isfinite(surface_maps[h])] for h in hemis]
    vmax = max((float(f.max()) for f in finite if f.size), default=0.0) or 1.0
    cut = visual_y_cut() if region == "visual" else None
    fig = go.Figure()
    colorbar = None
    placed = {}  # hemi -> (bool keep (10242,), x offset)
    for hemi in hemis:
        values = np.asarray(surface_maps[hemi], dtype=np.float32)
        # no value -> 0 -> the sulcal background (|value| <= 1e-6 is not coloured)
        shown = np.ascontiguousarray(np.nan_to_num(values, nan=0.0), dtype=np.float32)
        vertexcolor, bar = _nilearn_colours(hemi, shown.tobytes(), vmax)
        colorbar = colorbar or bar
        part = mesh.parts[hemi]
        coords, faces = np.asarray(part.coordinates, np.float64), np.asarray(part.faces)
        keep = np.zeros(len(coords), bool)
        keep[faces.ravel()] = True  # (the flat mesh leaves the medial wall out of every face)
        if cut is not None:
            keep &= np.asarray(inflated.parts[hemi].coordinates)[:, 1] < cut[hemi]
        kept, sub_faces = _sub_mesh(keep, faces)
        dx = (-HEMISPHERE_GAP_MM / 2 - coords[kept, 0].max() if hemi == "left"
              else HEMISPHERE_GAP_MM / 2 - coords[kept, 0].min())
        placed[hemi] = (keep, dx)
        z = np.zeros(len(kept)) if flat else coords[kept, 2]  # the flat patch keeps a little z: flatten it
        # binary float32 coordinates and uint16 faces (a hemisphere has 10,242 < 65,536 vertices): half the bytes
        # of int32 faces; the per-vertex colour strings are the one list left (plotly.js takes no packed colours)
        fig.add_trace(go.Mesh3d(x=(coords[kept, 0] + dx).astype(np.float32), y=coords[kept, 1].astype(np.float32),
                                z=z.astype(np.float32), i=sub_faces[:, 0].astype(np.uint16),
                                j=sub_faces[:, 1].astype(np.uint16), k=sub_faces[:, 2].astype(np.uint16),
                                vertexcolor=vertexcolor[kept].tolist(), name=hemi, showscale=False,
                                customdata=_hover_data(values, kept),
                                hovertemplate=_hover_template(hemi, value_label)))
    if colorbar is not None:
        fig.add_trace(go.Mesh3d(colorbar))
    for name, masks in (outlines or {}).items():
        xyz = []
        for hemi in hemis:
            if hemi not in masks:
                continue
            keep, dx = placed[hemi]
            part = mesh.parts[hemi]
            coords = np.asarray(part.coordinates, np.float64)
            border = outline_vertices(masks[hemi], np.asarray(part.faces)) & keep
            if flat:  # just above the flat map
                xyz.append(np.column_stack([coords[border, 0] + dx, coords[border, 1], np.ones(border.sum())]))
            else:  # just outside the surface (1.005 x the unshifted position), so the markers are not hidden by it
                xyz.append(coords[border] * 1.005 + np.array([dx, 0.0, 0.0]))
        xyz = (np.concatenate(xyz) if xyz else np.zeros((0, 3))).astype(np.float32)  # binary, 4 bytes a value
        if not len(xyz):
            continue
        fig.add_trace(go.Scatter3d(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], mode="markers", name=name,
                                   marker=dict(size=2.0 if flat else 1.5, color="black"),
                                   hovertemplate=f"{name}<extra></extra>"))
    axis = dict(visible=False, showbackground=False)
    scene = dict(xaxis=axis, yaxis=axis, zaxis=axis, aspectmode="data", camera=FLAT_CAMERA if flat else OCCIPITAL_CAMERA)
    if flat:
        # "data" would scale x and y up by the cube root of the (nearly zero) z range: set the map's own proportions
        xy = np.concatenate([np.column_stack([t.x, t.y]) for t in fig.data if t.name in hemis])
        span = np.ptp(xy, axis=0)
        scale = FLAT_SCALE / max(1.0, float(span[1] / span[0]) / FLAT_HEIGHT_RATIO)  # fit the height when taller
        scene.update(aspectmode="manual", aspectratio=dict(x=scale, y=scale * float(span[1] / span[0]), z=0.02),
                     dragmode="pan")  # a map: pan and zoom, no rotation by default
    fig.update_layout(title=dict(text=title) if title else None, height=380, margin=dict(l=0, r=0, t=30, b=0),
                      showlegend=False, scene=scene)
    return fig


def surface_figure(surface_maps: Mapping[str, np.ndarray], title: str = "",
                   outlines: Mapping[str, Mapping[str, np.ndarray]] | None = None, region: str = "visual",
                   value_label: str = "value"):
    """ONE plotly figure of per-vertex maps on the fsaverage5 inflated surface, hemispheres side by side.

    surface_maps : {"left"/"right": float (10242,)} (see :meth:`~brain_diffuser_core.nsd_surface.SurfaceMap.project`),
        one or both hemispheres; NaN = no value. One shared symmetric colour range (RdBu_r); vertices with no value
        or |value| <= 1e-6 show the sulcal background. The vertex colours are nilearn's (``plot_surf(engine=
        "plotly")``). Hovering a vertex shows "<hemi> <vertex>: <value_label> <value>" (3 significant digits; "NaN"
        where the vertex has no value), from each mesh's ``customdata`` float32 (n_kept, 2) [vertex id, value].
    outlines : optional {roi name: {"left"/"right": bool (10242,)}}; each ROI's border (:func:`outline_vertices`)
        is one black marker trace named after the ROI (both hemispheres).
    region : "visual" (default) crops each hemisphere to its vertices posterior to :func:`visual_y_cut` (half the
        triangles, every MiniNSD patch vertex kept); "whole" keeps the full meshes.

    The left hemisphere is shifted to x <= -gap/2 and the right one to x >= +gap/2 (gap
    :data:`HEMISPHERE_GAP_MM`), so they never overlap; the camera (:data:`OCCIPITAL_CAMERA`) looks at the
    occipital poles from behind and below (V1-V4 and the ventral category areas in view). Trace order: one
    mesh3d per hemisphere (name "left"/"right"), nilearn's colour bar (a 1-triangle invisible mesh3d), then
    the outline scatter3d traces.
    """
    return _hemispheres_figure(surface_maps, title, outlines, region, flat=False, value_label=value_label)


def flat_figure(surface_maps: Mapping[str, np.ndarray], title: str = "",
                outlines: Mapping[str, Mapping[str, np.ndarray]] | None = None, region: str = "visual",
                value_label: str = "value"):
    """The same maps as :func:`surface_figure` on nilearn's fsaverage5 FLAT map, seen from above (orthographic).

    Same arguments, colours, hover and trace order. "visual" keeps the vertices posterior to :func:`visual_y_cut`
    on the inflated surface (the occipital lobe and the ventral temporal surface, unfolded); the medial wall is
    not in the flat mesh. The left hemisphere lies left with its occipital pole towards the middle, the right one
    mirrored, as in pycortex's flat maps.
    """
    return _hemispheres_figure(surface_maps, title, outlines, region, flat=True, value_label=value_label)


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
