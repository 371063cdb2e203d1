"""Voxel patterns on the cortical surface: hemispheres, the voxel -> fsaverage5 vertex map, ROI outlines and
plotly figures. Plain functions (no streamlit); the app's pages call them.

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


def surface_figures(surface_maps: Mapping[str, np.ndarray], title: str = "",
                    outlines: Mapping[str, Mapping[str, np.ndarray]] | None = None):
    """plotly figures {hemi: Figure} of per-vertex maps on the fsaverage5 inflated surface (offline).

    surface_maps : {"left"/"right": float (10242,)} (see :func:`pattern_on_surface`); one shared symmetric
        colour range, vertices with |value| <= 1e-6 show the sulcal background.
    outlines : optional {roi name: {"left"/"right": bool (10242,)}} (see :func:`roi_on_surface`); each ROI's
        border (:func:`outline_vertices`) is drawn as a marker trace named after the ROI.
    """
    import plotly.graph_objects as go
    from nilearn import plotting

    mesh, sulc = fsaverage5_inflated()
    vmax = max(float(np.abs(m).max()) for m in surface_maps.values()) or 1.0
    figs = {}
    for hemi, values in surface_maps.items():
        active = float(np.abs(values).max()) > 1e-6
        disp = plotting.plot_surf(mesh.parts[hemi], surf_map=values, bg_map=sulc.data.parts[hemi], hemi=hemi,
                                  view="lateral" if hemi == "left" else "medial", engine="plotly", cmap="RdBu_r",
                                  symmetric_cmap=True, vmax=vmax, colorbar=True, threshold=1e-6 if active else None,
                                  title=f"{title} ({hemi})" if title else hemi)
        fig = disp.figure
        part = mesh.parts[hemi]
        coords, faces = np.asarray(part.coordinates), np.asarray(part.faces)
        for name, masks in (outlines or {}).items():
            border = outline_vertices(masks[hemi], faces)
            if not border.any():
                continue
            xyz = coords[border] * 1.005  # just outside the surface, so the markers are not hidden by it
            fig.add_trace(go.Scatter3d(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], mode="markers", name=name,
                                       marker=dict(size=1.5, color="black"), hoverinfo="name"))
        fig.update_layout(height=380, margin=dict(l=0, r=0, t=30, b=0))
        figs[hemi] = fig
    return figs


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
