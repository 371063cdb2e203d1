"""One self-contained section the Browse page and the ROI designer share: open a results folder written by
``sweep`` or ``reconstruct`` (on this machine or a cluster's shared disk) and page through its images, so a
cluster's results are looked at here, not regenerated. The reading is :mod:`brain_diffuser_core.batch.reader`.
"""
from __future__ import annotations

import streamlit as st

PER_PAGE = 12
COLUMNS = 4
#: filters offered when the folder's rows have these columns
FILTERS = ("pattern", "subject")


@st.cache_data(show_spinner="Reading the results folder...", ttl=30, max_entries=8)
def _open(folder: str, _mtime: float):
    from brain_diffuser_core.batch.reader import open_results

    return open_results(folder)


def _mtime(folder: str) -> float:
    """Changes whenever a shard lands, so a folder still being written is re-read."""
    from pathlib import Path

    shards = Path(folder).expanduser() / "shards"
    try:
        return shards.stat().st_mtime
    except OSError:
        return 0.0


def results_section(key: str, *, expanded: bool = False, kind: str | None = None) -> None:
    """An expander "Open a results folder": a folder path, filters (pattern, subject), pages of images.

    key : prefix of the widget keys (one per page); kind : preferred job kind, only for the help text.
    """
    with st.expander("Open a results folder (sweep / reconstruct output)", expanded=expanded):
        folder = st.text_input("Results folder (the --out of `python -m brain_diffuser_core sweep` or "
                               "`reconstruct`)", key=f"{key}_results_folder",
                               placeholder="e.g. sweeps/faces-v1" if kind == "sweep" else "e.g. recon/subj01")
        if not folder.strip():
            st.caption("Nothing opened yet.")
            return
        try:
            res = _open(folder.strip(), _mtime(folder.strip()))
        except ValueError as err:
            st.error(str(err))
            return
        state = "complete" if res.complete else "in progress or interrupted"
        st.caption(f"`{res.kind}`: {len(res.rows)} of {res.n_items} items ({state}); images: "
                   f"{', '.join(res.kinds()) or 'none'}.")
        cols = st.columns(len(FILTERS) + 1)
        chosen = {}
        for col, name in zip(cols, FILTERS):
            values = res.values(name)
            if values:
                chosen[name] = col.selectbox(name.capitalize(), ["(all)"] + [str(v) for v in values],
                                             key=f"{key}_results_{name}")
        kinds = res.kinds()
        if not kinds:
            st.info("No images in this folder yet.")
            return
        shown = cols[-1].selectbox("Image", kinds, index=len(kinds) - 1, key=f"{key}_results_kind")
        rows = res.select(**{k: (None if v == "(all)" else v) for k, v in chosen.items()})
        _, n_pages = res.page(rows, 0, PER_PAGE)
        page = st.number_input(f"Page (of {n_pages})", 1, n_pages, 1, key=f"{key}_results_page") - 1
        page_rows, _ = res.page(rows, page, PER_PAGE)
        grid = st.columns(COLUMNS)
        for i, row in enumerate(page_rows):
            path = res.image_path(row, shown)
            caption = " | ".join(str(row[c]) for c in ("pattern", "subject", "image_id") if c in row)
            caption = f"{caption} | seed {row['seed']}" if "seed" in row else caption
            with grid[i % COLUMNS]:
                if path is not None and path.is_file():
                    st.image(str(path), caption=caption or row["key"], width="stretch")
                else:
                    st.caption(f"{row['key']}: no {shown} image")
