"""Browse test trials: original | stage 1 (VDVAE) | final (Versatile Diffusion), with captions and downloads."""
from __future__ import annotations

import streamlit as st

from pages import _state, _views

MAX_CACHED = 16  # reconstructions kept per session (each holds a few images and feature arrays)

ctx = _state.context()
bd = _state.diffuser(ctx.bundle_path, ctx.device)
subject = int(ctx.subject)
subj = _state.subject_data(ctx.nsd_root, subject)
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
key = (ctx.bundle_path, subject, image_id, ctx.seed, tuple(sorted(settings.items())))
results: dict = st.session_state.setdefault("browse_results", {})
c1, c2 = st.columns([1, 3])
live = c1.checkbox("Run live (stream diffusion previews)", value=True, key="browse_live")
run = c1.button("Reconstruct" if key not in results else "Reconstructed (cached)", type="primary",
                key="browse_run", disabled=key in results)

orig_col, s1_col, final_col = st.columns(3)
orig_col.image(subj.image(image_id), caption=f"original (73k id {image_id})", width="stretch")
for c in captions[image_id][:5]:
    orig_col.caption(f"- {c}")
if run:
    bar = c2.progress(0.0, text="decoding features")
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
                             callback=on_progress, preview_every=every, **settings)[0]
    except (ValueError, RuntimeError) as err:
        st.error(f"Reconstruction failed: {err}")
        st.stop()
    bar.progress(1.0, text=f"done in {rec.timings['total']:.1f} s")
    preview_slot.empty()
    while len(results) >= MAX_CACHED:
        results.pop(next(iter(results)))
    results[key] = rec

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
