"""Browse test trials: original | stage 1 (VDVAE) | final (Versatile Diffusion), with captions and downloads;
a gallery of many trials reconstructed in batches, downloadable as one zip."""
from __future__ import annotations

import streamlit as st

from brain_diffuser_core.download import missing_data_hint
from brain_diffuser_core.export import reconstructions_zip, zip_item
from pages import _results, _state, _views

MAX_GALLERY = 32  # trials in one gallery
GALLERY_BATCH = 4  # trials per generation batch
GALLERY_COLUMNS = 3  # trials per gallery row (each shows original | final)

ctx = _state.context()
bd = _state.diffuser(ctx.bundle_path, ctx.device)
subject = int(ctx.subject)
try:
    subj = _state.subject_data(ctx.nsd_root, subject)
except FileNotFoundError as err:  # a folder bundle's NSD root without the subject's files
    st.error(missing_data_hint(ctx.nsd_root, subject, err))
    st.stop()
test_ids = [int(i) for i in subj.test_image_ids]

st.title("Browse test trials")
st.caption(f"Subject {subject}: {len(test_ids)} test images (repeats averaged, z-scored with train statistics).")


@st.cache_data(show_spinner="Reading captions...", max_entries=8)
def test_captions(nsd_root: str, subject: int) -> dict[int, list[str]]:
    """73k id -> captions of every test image of a subject ([] where none are found)."""
    data = _state.subject_data(nsd_root, subject)
    out = {}
    for i in data.test_image_ids:
        try:
            out[int(i)] = data.captions(int(i))
        except (FileNotFoundError, ValueError):
            out[int(i)] = []
    return out


captions = test_captions(ctx.nsd_root, subject)

# 1. Pick a trial
how = st.radio("Pick a trial by", ["index", "73k id", "caption search"], key="browse_pick", horizontal=True)
if how == "index":
    idx = int(st.number_input(f"Test trial index (0-{len(test_ids) - 1})", 0, len(test_ids) - 1, 0, key="browse_index"))
    image_id = test_ids[idx]
elif how == "73k id":
    image_id = int(st.selectbox("73k image id", test_ids, key="browse_id"))
else:
    query = st.text_input("Words in a caption", key="browse_query", placeholder="e.g. face, sign, kitchen")
    words = [w for w in query.lower().split() if w]
    matches = [i for i in test_ids if all(any(w in c.lower() for c in captions[i]) for w in words)] if words else test_ids
    if not matches:
        st.warning(f"No test image has a caption containing {' and '.join(repr(w) for w in words)}.")
        st.stop()
    image_id = int(st.selectbox(f"{len(matches)} matching image(s)", matches, key="browse_match",
                                format_func=lambda i: f"{i}: {(captions[i] or ['(no caption)'])[0]}"))
row = test_ids.index(image_id)

# 2. Reconstruct (cached per bundle, subject, trial, seed, settings)
settings = {"num_inference_steps": ctx.num_inference_steps}


def result_key(image_id: int) -> tuple:
    """Per-session cache key of a trial's reconstruction: (bundle, subject, 73k id, seed, settings)."""
    return (ctx.bundle_path, subject, int(image_id), ctx.seed, tuple(sorted(settings.items())))


def remember(rec, image_id: int) -> None:
    results.store(result_key(image_id), _state.strip_features(rec))  # images only (about 1.6 MB at 512 px)


key = result_key(image_id)
results = _state.session_cache("browse_results")  # bounded in bytes, this session's and the server's
c1, c2 = st.columns([1, 3])
live = c1.checkbox("Run live (stream diffusion previews)", value=True, key="browse_live")
run = c1.button("Reconstruct" if key not in results else "Reconstructed (cached)", type="primary",
                key="browse_run", disabled=key in results)

orig_col, s1_col, final_col = st.columns(3)
orig_col.image(subj.image(image_id), caption=f"original (73k id {image_id})", width="stretch")
for c in captions[image_id][:5]:
    orig_col.caption(f"- {c}")
if run:
    status = c2.status("Reconstructing...", expanded=True)
    bar = status.progress(0.0, text="decoding features")
    preview_slot = final_col.empty()
    every = max(1, ctx.num_inference_steps // 10) if live else 0

    def on_progress(stage: str, step: int, total: int, preview) -> None:
        if stage == "stage1":
            bar.progress(0.1, text="stage 1 (VDVAE) done")
            if live and preview is not None:
                s1_col.image(preview[0], caption="stage 1 (VDVAE, upscaled)", width="stretch")
            return
        bar.progress(0.1 + 0.9 * step / max(total, 1), text=f"diffusion step {step} of {total}")
        if live and preview is not None:
            preview_slot.image(preview[0], caption=f"diffusion preview, step {step} of {total}", width="stretch")

    try:
        rec = bd.reconstruct(subj.test_fmri[row:row + 1], subject, image_ids=[image_id], base_seed=ctx.seed,
                             callback=on_progress, preview_every=every,
                             on_wait=_state.queue_reporter(status, "Reconstructing..."), **settings)[0]
    except (ValueError, RuntimeError) as err:
        status.update(label="Reconstruction failed", state="error")
        st.error(f"Reconstruction failed: {err}")
        st.stop()
    bar.progress(1.0, text=f"done in {rec.timings['total']:.1f} s")
    status.update(label=f"Reconstructed in {rec.timings['total']:.1f} s", state="complete", expanded=False)
    preview_slot.empty()
    remember(rec, image_id)

rec = results.get(key)
if rec is not None:
    s1_col.image(rec.stage1_upscaled, caption="stage 1 (VDVAE, upscaled)", width="stretch")
    final_col.image(rec.final, caption=f"final (seed {rec.seed})", width="stretch")
    d1, d2 = st.columns(2)
    d1.download_button("Download stage 1 (PNG)", _views.png_bytes(rec.stage1_upscaled),
                       file_name=f"subj{subject:02d}_nsd{image_id}_stage1.png", mime="image/png", key="browse_dl_s1")
    d2.download_button("Download final (PNG)", _views.png_bytes(rec.final),
                       file_name=f"subj{subject:02d}_nsd{image_id}_seed{rec.seed}.png", mime="image/png",
                       key="browse_dl_final")
    st.caption(f"features {rec.timings['features']:.2f} s, stage 1 {rec.timings['stage1']:.2f} s, "
               f"stage 2 {rec.timings['stage2']:.2f} s ({rec.settings['denoising_steps']} denoising steps)")
else:
    s1_col.info("Press Reconstruct to decode this trial.")

# 3. Gallery: many trials, reconstructed in batches (each cached like a single trial), downloadable as a zip
st.divider()
st.subheader("Gallery")
gallery_ids = [int(i) for i in st.multiselect(
    f"Trials in the gallery (up to {MAX_GALLERY})", test_ids, default=test_ids[:min(6, len(test_ids))],
    max_selections=MAX_GALLERY, key="browse_gallery_ids",
    format_func=lambda i: f"{i}: {(captions[i] or ['(no caption)'])[0][:60]}")]
missing = [i for i in gallery_ids if result_key(i) not in results]
g1, g2 = st.columns([1, 3])
run_gallery = g1.button(f"Reconstruct {len(missing)} trial(s)" if missing else "Gallery reconstructed (cached)",
                        key="browse_gallery_run", disabled=not missing)
if run_gallery:
    status = g2.status(f"Reconstructing {len(missing)} trial(s)...", expanded=True)
    bar = status.progress(0.0, text=f"0 of {len(missing)} trials")
    for start in range(0, len(missing), GALLERY_BATCH):
        chunk = missing[start:start + GALLERY_BATCH]
        rows = [test_ids.index(i) for i in chunk]
        label = f"Reconstructing trials {start + 1}-{start + len(chunk)} of {len(missing)}..."
        status.update(label=label)
        try:
            recs = bd.reconstruct(subj.test_fmri[rows], subject, image_ids=chunk, base_seed=ctx.seed,
                                  on_wait=_state.queue_reporter(status, label), **settings)
        except (ValueError, RuntimeError) as err:
            status.update(label="Gallery reconstruction failed", state="error")
            st.error(f"Reconstruction of trials {chunk} failed: {err}")
            st.stop()
        for i, rec in zip(chunk, recs):
            remember(rec, i)
        done = start + len(chunk)
        bar.progress(done / len(missing), text=f"{done} of {len(missing)} trials")
    status.update(label=f"Reconstructed {len(missing)} trial(s)", state="complete", expanded=False)

done = {i: results.get(result_key(i)) for i in gallery_ids}  # one read each: another session may evict
done_ids = [i for i in gallery_ids if done[i] is not None]
for start in range(0, len(gallery_ids), GALLERY_COLUMNS):
    cols = st.columns(2 * GALLERY_COLUMNS)
    for k, i in enumerate(gallery_ids[start:start + GALLERY_COLUMNS]):
        cols[2 * k].image(subj.image(i), caption=f"{i}: original", width="stretch")
        rec = done[i]
        if rec is not None:
            cols[2 * k + 1].image(rec.final, caption=f"{i}: final (seed {rec.seed})", width="stretch")
        else:
            cols[2 * k + 1].caption(f"{i}: not reconstructed yet")
if done_ids:
    zip_key = tuple(result_key(i) for i in done_ids)
    memo = st.session_state.get("browse_zip")
    if memo is None or memo[0] != zip_key:  # build once per selection, not on every rerun
        items = [zip_item(i, done[i], original=subj.image(i)) for i in done_ids]
        memo = (zip_key, reconstructions_zip(items, extra={"bundle": ctx.bundle_path, "subject": subject,
                                                           "base_seed": ctx.seed}))
        st.session_state["browse_zip"] = memo
    n_done = f"{len(done_ids)} trial{'s' if len(done_ids) != 1 else ''}"
    st.download_button(f"Download the gallery (zip, {n_done})", memo[1],
                       file_name=f"subj{subject:02d}_gallery_{len(done_ids)}trials_seed{ctx.seed}.zip",
                       mime="application/zip", key="browse_dl_zip", on_click="ignore")

# reconstructions made in bulk by `python -m brain_diffuser_core reconstruct` (here or on a cluster)
st.divider()
_results.results_section("browse", kind="reconstruct")
