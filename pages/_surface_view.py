"""The pattern views the ROI designer and the walkthrough share: a voxel pattern on the fsaverage5 surface or its
flat map (from NSD's transform files: real subjects and the MiniNSD world alike), with ROI outlines; the voxel
scatter only when the transforms are missing, with a message naming them. Streamlit glue only: the data come from
:mod:`brain_diffuser_core.nsd_surface`, the figures from :mod:`brain_diffuser_core.surface`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import streamlit as st

from brain_diffuser_core import nsd_surface, surface
from brain_diffuser_core.nsd_format import NSDPaths
from pages import _state

VIEWS = ("surface (inflated)", "flat map")


@st.cache_resource(max_entries=32)
def _outlines(nsd_root: str, subject: int, rois: tuple[str, ...]):
    """({roi: {hemi: bool (10242,)}}, notes) for the subject's ROIs (surface labels, else voxel masks)."""
    smap, _ = _state.surface_map(nsd_root, subject)
    subj = _state.subject_data(nsd_root, subject)
    return nsd_surface.roi_outlines(NSDPaths(nsd_root, subject), smap, rois, subj.roi_mask)


def view_choice(key: str) -> str:
    """The surface / flat map radio (one per page, so the two pages keep their own choice)."""
    return st.radio("View", VIEWS, key=f"{key}_view", horizontal=True)


def show_surface_maps(maps: dict, title: str, view: str, key: str, outlines: dict | None = None,
                      value_label: str = "value") -> None:
    """One plotly chart of {"left"/"right": float32 (10242,)} maps in the chosen view."""
    draw = surface.flat_figure if view == VIEWS[1] else surface.surface_figure
    st.plotly_chart(draw(maps, title=title, outlines=outlines, value_label=value_label), key=f"{key}_{view[:4]}")


def show_pattern(nsd_root: str, subject: int, pattern: np.ndarray, title: str, key: str,
                 rois: Sequence[str] = (), value_label: str = "value") -> str | None:
    """Draw a voxel pattern (float (n_voxels,)) of ``subject``; returns the chosen view, or None in voxel space.

    With the transform files: a view radio, then the surface (or flat map) with the outlines of ``rois``. Without:
    the voxel scatter and an info box naming the missing files and what they give.
    """
    smap, why = _state.surface_map(nsd_root, subject)
    if smap is None:
        subj = _state.subject_data(nsd_root, subject)
        st.info(f"No surface view for subject {subject}, so the pattern is shown in voxel space (i, j, k): {why}")
        st.plotly_chart(surface.voxel_figure(pattern, subj.voxel_ijk, title=title), key=f"{key}_voxels")
        return None
    for note in smap.notes:
        st.warning(note)
    outlines, notes = _outlines(nsd_root, subject, tuple(rois)) if rois else ({}, [])
    for note in notes:
        st.warning(note)
    maps = smap.project(pattern)
    view = view_choice(key)
    if view == VIEWS[0]:
        title += ", seen from behind and below"
    show_surface_maps(maps, title, view, key, outlines=outlines, value_label=value_label)
    n_covered = sum(int(smap.covered(h).sum()) for h in maps)
    st.caption(f"{n_covered:,} of {2 * nsd_surface.FSAVERAGE5_N_VERTICES:,} fsaverage5 vertices get a value "
               "(NSD's sampling at three cortical depths, mean over depths, coverage >= 0.5); hover for values "
               "(NaN: no value)"
               + ("; black: ROI outlines" if outlines else "") + ".")
    return view


def surface_upload(label: str, key: str) -> tuple[dict | None, list[str]]:
    """An uploader for patterns already on the surface (GIfTI / MGH per hemisphere); (maps or None, file names)."""
    files = st.file_uploader(label, type=["gii", "mgz", "mgh"], accept_multiple_files=True, key=key)
    if not files:
        return None, []
    try:
        maps = nsd_surface.surface_patterns_from_uploads([(f.name, f.getvalue()) for f in files])
    except ValueError as err:
        st.error(str(err))
        return None, []
    return maps, [f.name for f in files]


def show_uploaded_surface(maps: dict, names: list[str], view: str, key: str) -> None:
    """The uploaded surface pattern, with a note that it is shown, not decoded."""
    st.markdown(f"**Uploaded surface pattern** ({', '.join(names)}; {', '.join(maps)} hemisphere"
                f"{'s' if len(maps) > 1 else ''}): shown for comparison only, **not decoded**: the decoders take "
                "one value per voxel, and a surface pattern cannot be turned back into voxels.")
    show_surface_maps(maps, "uploaded (fsaverage5)", view, key)
