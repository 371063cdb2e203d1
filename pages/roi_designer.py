"""ROI designer: build a synthetic fMRI pattern from ROI weights (or upload one) and see the scenes it evokes.

The paper's ROI-optimal scenes: a pattern of weight w inside each chosen ROI and 0 elsewhere (not z-scored)
goes through the decoders; the pattern-driven part of the predicted features goes along its direction as far
as the top 1% of training images do (the intercept is kept) and, for the subject average, is averaged over
subjects (``BrainDiffuser.reconstruct_pattern``). A button makes the paper's whole ROI figure.
"""
from __future__ import annotations

import hashlib

import numpy as np
import streamlit as st

from brain_diffuser_core import export, roi_grid, surface
from brain_diffuser_core import patterns as pattern_lib
from brain_diffuser_core.download import missing_data_hint
from brain_diffuser_core.rois import PAPER_ROIS, PAPER_PRESETS, ROI_CATALOGUE, roi_names
from pages import _results, _state, _surface_view, _views

CUSTOM = "(custom)"
GROUPS = (("The paper's eight ROIs", PAPER_ROIS), ("Fine ROIs", tuple(roi_names("fine"))),
          ("Eccentricity bands", tuple(roi_names("eccentricity"))))

ctx = _state.context()
bd = _state.diffuser(ctx.bundle_path, ctx.device)
subjects = ctx.single_subjects
subject_data = {}
for s in subjects:
    try:
        subject_data[s] = _state.subject_data(ctx.nsd_root, s)
    except FileNotFoundError as err:  # a folder bundle's NSD root without this subject's files
        st.error(missing_data_hint(ctx.nsd_root, s, err))
        st.stop()
available = [r for r in ROI_CATALOGUE if all(r in d.roi_names() for d in subject_data.values())]

SCENE = "ROI designer"  # the presenter's scene (pages/_state.py, "presenter"): weights, preset, hemisphere, seeds
SCENE_KEYS = tuple(f"roi_w_{roi}" for roi in ROI_CATALOGUE) + ("roi_preset", "roi_hemisphere", "roi_n_seeds")
_state.follow_scene(SCENE, SCENE_KEYS)

st.title("ROI designer")
st.caption("Weights inside regions of interest make a synthetic fMRI pattern (weight inside the ROI, 0 elsewhere, "
           "not z-scored, as in the paper); the decoders turn it into the scene that region 'prefers'.")
# scenes made in bulk by `python -m brain_diffuser_core sweep` (here or on a cluster), paged through
_results.results_section("roi", kind="sweep")


N_DRIVING = 8


@st.cache_data(show_spinner="Ranking the training images...", max_entries=16)
def _driving_images(nsd_root: str, subject: int, digest: str, _subject, _pattern: np.ndarray, k: int = N_DRIVING):
    """(73k ids int64 (k,), scores float32 (k,), images list of uint8 (S, S, 3)) of the training images that drive
    ``_pattern`` most in ``_subject`` (the loaded Subject ``subject`` of ``nsd_root``); cached per (NSD root,
    subject, pattern digest, k)."""
    d = _subject
    ids, scores = pattern_lib.top_driving_images(d.train_fmri, d.train_image_ids, _pattern, k=k)
    return ids, scores, [d.image(int(i)) for i in ids]


def _upload_stem(name: str) -> str:
    for ext in (".nii.gz", ".nii", ".npy"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name.rsplit(".", 1)[0]


def _wkey(roi: str) -> str:
    return f"roi_w_{roi}"


def _apply_weights(weights: dict, hemisphere: str | None = None) -> None:
    for roi in ROI_CATALOGUE:
        st.session_state[_wkey(roi)] = float(weights.get(roi, 0.0))
    if hemisphere is not None:
        st.session_state["roi_hemisphere"] = hemisphere


def _on_preset() -> None:
    name = st.session_state["roi_preset"]
    if name != CUSTOM:
        _apply_weights(dict(PAPER_PRESETS[name]))


# 1. Load a saved pattern (before the sliders exist, so it can set them)
with st.expander("Load a saved pattern"):
    loaded = st.file_uploader("Load pattern JSON", type=["json"], key="roi_load_json",
                              max_upload_size=_state.upload_limit_mb())
    refused = _state.refuse_upload(loaded) if loaded is not None else ""
    if refused:
        st.error(refused)
    elif loaded is not None and st.session_state.get("roi_loaded_id") != loaded.file_id:
        st.session_state["roi_loaded_id"] = loaded.file_id
        try:
            spec = _views.pattern_from_json(loaded.getvalue(), available)
        except ValueError as err:
            st.error(f"{loaded.name}: {err}")
        else:
            _apply_weights(spec["weights"], spec["hemisphere"])
            st.session_state["roi_preset"] = CUSTOM
            st.success(f"Loaded pattern {spec['name']!r} from {loaded.name}.")

# 2. Weights, presets, hemisphere
for roi in ROI_CATALOGUE:
    st.session_state.setdefault(_wkey(roi), 1.0 if roi == "V1" else 0.0)
left, right = st.columns([1, 1])
with left:
    st.selectbox("Preset (the paper's figures)", [CUSTOM] + list(PAPER_PRESETS), key="roi_preset",
                 on_change=_on_preset)
    hemisphere = st.radio("Hemisphere", list(surface.HEMISPHERES), key="roi_hemisphere", horizontal=True)
    for label, group in GROUPS:
        names = [r for r in group if r in available]
        with st.expander(label, expanded=label.startswith("The paper")):
            for roi in names:
                spec = ROI_CATALOGUE[roi]
                st.slider(f"{roi}: {spec.description}", -1.0, 2.0, step=0.1, key=_wkey(roi))
weights = {r: float(st.session_state[_wkey(r)]) for r in available if st.session_state[_wkey(r)] != 0}
_state.publish_scene(SCENE, {k: st.session_state[k] for k in SCENE_KEYS if k in st.session_state})

# 3. Optional uploaded voxel vector (one subject)
with left:
    upload = st.file_uploader("...or upload a pattern: a voxel vector (.npy, one value per voxel) or a volume in "
                              "the subject's func1pt8mm space (.nii, .nii.gz)", type=["npy", "nii", "nii.gz"],
                              key="roi_upload_npy", max_upload_size=_state.upload_limit_mb())
    surface_upload, surface_upload_names = _surface_view.surface_upload(
        "...and, to compare, a pattern already on the surface: one GIfTI (.gii) or FreeSurfer (.mgz) file per "
        "hemisphere on fsaverage (163,842 vertices) or fsaverage5 (10,242), lh./rh. in the name (shown, not "
        "decoded)", key="roi_upload_surface")
uploaded_vector = None
refused = _state.refuse_upload(upload) if upload is not None else ""
if refused:
    left.error(refused)
elif upload is not None:
    if ctx.subject == _state.AVERAGE:
        left.error("An uploaded vector belongs to one subject's voxels: choose a single subject in the sidebar.")
    else:
        s = subjects[0]
        d = subject_data[s]
        try:
            if upload.name.lower().endswith((".nii", ".nii.gz")):
                uploaded_vector = pattern_lib.pattern_from_nifti(upload.getvalue(), d.voxel_ijk, d.volume_shape,
                                                                 d.affine)
            else:
                uploaded_vector = _views.parse_pattern_npy(upload.getvalue(), d.n_voxels)
        except ValueError as err:
            left.error(f"{upload.name}: {err}")
        else:
            left.success(f"Using {upload.name}: {uploaded_vector.shape[0]} voxels of subject {s} "
                         "(the ROI weights are ignored while it is uploaded).")

# 4. The pattern per subject
patterns: dict[int, np.ndarray] = {}
if uploaded_vector is not None:
    patterns = {subjects[0]: uploaded_vector}
    pattern_name = _upload_stem(upload.name)
elif weights:
    for s, d in subject_data.items():
        hemi = _state.hemisphere_of_voxels(ctx.nsd_root, s)
        patterns[s] = surface.restrict_to_hemisphere(d.synthetic_pattern(weights), hemi, hemisphere)
    preset = st.session_state["roi_preset"]
    base = preset if preset != CUSTOM and weights == dict(PAPER_PRESETS[preset]) else \
        "+".join(r if w == 1 else f"{w:g}*{r}" for r, w in weights.items())  # e.g. "V1+0.5*faces"
    pattern_name = base if hemisphere == "both" else f"{base} ({hemisphere})"

with left.expander("Save this pattern", expanded=False):
    if weights:
        st.download_button("Save pattern JSON", _views.pattern_to_json(pattern_name if uploaded_vector is None
                                                                        else "pattern", weights, hemisphere),
                           file_name="roi_pattern.json", mime="application/json", key="roi_save_json")
    else:
        st.caption("Set at least one weight to save a pattern.")

with right:
    if not patterns:
        st.info("Set at least one ROI weight (or choose a preset) to make a pattern.")
        st.stop()
    shown = subjects[0]
    pat = patterns[shown]
    n_active = int(np.count_nonzero(pat))
    st.markdown(f"**Pattern `{pattern_name}`**: {n_active} of {pat.size} voxels active in subject {shown}"
                + (f" (the average uses subjects {', '.join(map(str, subjects))})" if len(subjects) > 1 else ""))
    if n_active == 0:
        st.warning("No voxel of this subject lies in the chosen ROIs and hemisphere: the pattern is all zeros.")
    hemi_note = _state.hemispheres(ctx.nsd_root, shown)[1]
    if hemi_note and hemisphere != "both":
        st.warning(hemi_note)
    view = _surface_view.show_pattern(ctx.nsd_root, shown, pat, key="roi", value_label="weight",
                                      title=f"subject {shown}: left | right hemisphere",
                                      rois=() if uploaded_vector is not None else tuple(weights))
    if surface_upload:
        _surface_view.show_uploaded_surface(surface_upload, surface_upload_names, view or _surface_view.VIEWS[0],
                                            key="roi_uploaded")

# 5. Generate ROI-optimal scenes
st.divider()
gen_left, gen_right = st.columns([1, 3])
n_seeds = gen_left.slider("Scenes (seeds)", 1, 8, 4, key="roi_n_seeds")
go = gen_left.button("Generate", type="primary", key="roi_generate",
                     disabled=bool(patterns) and all(not np.any(p) for p in patterns.values()))
digest = hashlib.sha256(b"".join(patterns[s].tobytes() for s in sorted(patterns))).hexdigest()
result_key = (ctx.bundle_path, tuple(sorted(patterns)), pattern_name, digest, n_seeds, ctx.seed,
              ctx.num_inference_steps)
results = _state.session_cache("roi_results")  # bounded in bytes, this session's and the server's
if go:
    status = gen_right.status("Generating...", expanded=False)
    bar = gen_right.progress(0.0, text="decoding features")

    def on_progress(stage: str, step: int, total: int, _preview) -> None:
        frac = 0.1 if stage == "stage1" else 0.1 + 0.9 * step / max(total, 1)
        bar.progress(min(frac, 1.0), text=f"{stage}: step {step} of {total}")

    try:
        recs = bd.reconstruct_pattern(patterns, name=pattern_name, n_seeds=n_seeds, base_seed=ctx.seed,
                                      callback=on_progress, num_inference_steps=ctx.num_inference_steps,
                                      on_wait=_state.queue_reporter(status, "Generating..."))
    except (ValueError, RuntimeError) as err:
        status.update(label="Generation failed", state="error")
        gen_right.error(f"Generation failed: {err}")
    else:
        bar.progress(1.0, text="done")
        status.update(label=f"Generated {len(recs)} scene(s) in {recs[0].timings['total']:.1f} s", state="complete")
        results.store(result_key, recs)
        _state.publish_result(SCENE, result_key, recs)
recs = results.get(result_key)
if recs is None:
    recs = _state.shared_result(SCENE, result_key)  # the presenter generated this very pattern and settings
    if recs is not None:
        gen_right.caption("Shown from the presenter's generation of this pattern (same settings): nothing was run "
                          "again.")
if recs:
    cols = gen_right.columns(min(len(recs), 4))
    for i, rec in enumerate(recs):
        with cols[i % len(cols)]:
            st.image(rec.final if rec.final is not None else rec.stage1_upscaled,
                     caption=f"seed {rec.seed}", width="stretch")
            st.image(rec.stage1, caption="stage 1 (VDVAE)", width=96)
    gen_right.caption(f"{len(recs)} scene(s) for `{pattern_name}` in {recs[0].timings['total']:.1f} s; "
                      f"{recs[0].settings['denoising_steps']} denoising steps each.")
    # The original stimuli that drive this pattern most (one subject: the first one of an average)
    if np.any(pat):
        ids, scores, images = _driving_images(ctx.nsd_root, shown, hashlib.sha256(pat.tobytes()).hexdigest(),
                                               subject_data[shown], pat)
        gen_right.markdown(f"**Training images that drive this pattern most** (subject {shown}"
                           + (", the first subject of the average" if len(subjects) > 1 else "")
                           + "): score = weighted mean z-scored response inside the pattern.")
        dcols = gen_right.columns(min(len(ids), 8))
        for i, (image_id, score, image) in enumerate(zip(ids, scores, images)):
            dcols[i % len(dcols)].image(image, caption=f"73k {int(image_id)}, score {float(score):.2f}",
                                        width="stretch")
    else:
        gen_right.caption(f"No training images are ranked: the pattern is all zeros in subject {shown}.")

# 6. The paper's ROI figure: every ROI x (each subject + the average), a few seeds each
st.divider()
with st.expander("The paper's ROI figure: 8 ROIs + 5 eccentricity bands x subjects + average"):
    fig_left, fig_right = st.columns([1, 3])
    grid_seeds = fig_left.slider("Seeds per cell", 1, 4, 2, key="roi_grid_seeds")
    n_cells = len(roi_grid.GRID_ROIS) * (len(ctx.subjects) + (len(ctx.subjects) > 1))
    fig_left.caption(f"{n_cells} cells x {grid_seeds} seed(s) = {n_cells * grid_seeds} generations.")
    grid_key = (ctx.bundle_path, grid_seeds, ctx.seed, ctx.num_inference_steps)
    if fig_left.button("Make the ROI figure", key="roi_grid_go"):
        grid_status = fig_right.status("Making the ROI figure...", expanded=False)
        grid_bar = fig_right.progress(0.0, text="starting")
        all_data, missing = {}, None
        for s in ctx.subjects:
            try:
                all_data[s] = _state.subject_data(ctx.nsd_root, s)
            except FileNotFoundError as err:  # another subject's files are missing from the NSD root
                missing = missing_data_hint(ctx.nsd_root, s, err)
                break
        grid = None
        try:
            if missing is None:
                grid = roi_grid.make_roi_grid(
                    bd, all_data, n_seeds=grid_seeds, base_seed=ctx.seed,
                    num_inference_steps=ctx.num_inference_steps,
                    progress=lambda label, done, total: grid_bar.progress(done / total,
                                                                          text=f"{label} ({done}/{total})"),
                    on_wait=_state.queue_reporter(grid_status, "Making the ROI figure..."))
        except (ValueError, RuntimeError) as err:
            missing = f"ROI figure failed: {err}"
        if grid is None:
            grid_status.update(label="ROI figure failed", state="error")
            fig_right.error(missing)
        else:
            grid_status.update(label="ROI figure done", state="complete")
            st.session_state["roi_grid"] = (grid_key, grid.to_image())
    saved = st.session_state.get("roi_grid")
    if saved and saved[0] == grid_key:
        fig_right.image(saved[1], caption="rows: ROIs; columns: subjects and their average, seeds side by side",
                        width="stretch")
        fig_right.download_button("Download the ROI figure (PNG)", export.png_bytes(saved[1]),
                                  file_name="roi_figure.png", mime="image/png", key="roi_grid_download")
