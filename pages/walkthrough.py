"""Walkthrough: one trial through Brain-Diffuser step by step, with the stage-2 settings on sliders."""
from __future__ import annotations

import numpy as np
import streamlit as st

from brain_diffuser_core import neighbours
from brain_diffuser_core.config import PAPER
from brain_diffuser_core.download import missing_data_hint
from pages import _state, _surface_view, _views

ctx = _state.context()
bd = _state.diffuser(ctx.bundle_path, ctx.device)
subject = int(ctx.subject)
try:
    subj = _state.subject_data(ctx.nsd_root, subject)
except FileNotFoundError as err:  # a folder bundle's NSD root without the subject's files
    st.error(missing_data_hint(ctx.nsd_root, subject, err))
    st.stop()
test_ids = [int(i) for i in subj.test_image_ids]
s2 = PAPER.stage2

SCENE = "Walkthrough"  # the presenter's scene (pages/_state.py, "presenter"): its trial and sliders
SCENE_KEYS = ("walk_index", "walk_strength", "walk_mix", "walk_guidance")
_state.follow_scene(SCENE, SCENE_KEYS)

st.title("Walkthrough")
st.caption("One test trial of subject %d through both stages. Defaults are the paper's." % subject)

idx = int(st.number_input(f"Test trial index (0-{len(test_ids) - 1})", 0, len(test_ids) - 1, 0, key="walk_index"))
image_id = test_ids[idx]

a, b, c = st.columns(3)
strength = a.slider("Strength", 0.05, 1.0, float(s2.strength), 0.05, key="walk_strength")
a.caption("How much of the stage-1 image diffusion may repaint: it runs the last strength x steps of the "
          f"schedule ({int(ctx.num_inference_steps * strength)} of {ctx.num_inference_steps} now; the paper: "
          f"{s2.denoising_steps} of {s2.num_inference_steps}). Low keeps the layout, high trusts CLIP.")
vision_mix = b.slider("Vision/text mix", 0.0, 1.0, float(s2.vision_mix), 0.05, key="walk_mix")
b.caption("Weight of the CLIP-vision guidance in each cross-attention block; the rest goes to CLIP-text "
          f"(the paper: {s2.vision_mix:g} vision, {s2.text_mix:g} text).")
guidance = c.slider("Guidance scale", 1.0, 15.0, float(s2.guidance_scale), 0.5, key="walk_guidance")
c.caption("Classifier-free guidance: how far each step is pushed away from the unconditional prediction "
          f"toward the decoded features (the paper: {s2.guidance_scale:g}); 1 turns it off.")

_state.publish_scene(SCENE, {k: st.session_state[k] for k in SCENE_KEYS})
settings = {"strength": strength, "vision_mix": vision_mix, "guidance_scale": guidance,
            "num_inference_steps": ctx.num_inference_steps}
key = (ctx.bundle_path, subject, image_id, ctx.seed, tuple(sorted(settings.items())))
store = _state.session_cache("walk_results")  # bounded in bytes, this session's and the server's
if st.button("Run this trial", type="primary", key="walk_run"):
    status = st.status("Running the trial...", expanded=False)
    bar = st.progress(0.0, text="decoding features")
    previews: list[tuple[int, np.ndarray]] = []
    total_steps = max(1, int(ctx.num_inference_steps * strength))
    every = max(1, total_steps // 6)

    def on_progress(stage: str, step: int, total: int, preview) -> None:
        if stage == "stage2":
            bar.progress(0.1 + 0.9 * step / max(total, 1), text=f"diffusion step {step} of {total}")
            if preview is not None:
                previews.append((step, preview[0]))

    try:
        rec = bd.reconstruct(subj.test_fmri[idx:idx + 1], subject, image_ids=[image_id], base_seed=ctx.seed,
                             callback=on_progress, preview_every=every,
                             on_wait=_state.queue_reporter(status, "Running the trial..."), **settings)[0]
    except (ValueError, RuntimeError) as err:
        status.update(label="The walkthrough failed", state="error")
        st.error(f"The walkthrough failed: {err}")
        st.stop()
    bar.progress(1.0, text=f"done in {rec.timings['total']:.1f} s")
    status.update(label=f"Done in {rec.timings['total']:.1f} s", state="complete")
    store.store(key, (rec, previews))
    _state.publish_result(SCENE, key, (rec, previews))

shown = store.get(key)
if shown is None:
    shown = _state.shared_result(SCENE, key)  # the presenter ran this very trial and settings
    if shown is not None:
        st.caption("Shown from the presenter's run of this trial (same settings): nothing was run again.")
if shown is None:
    st.info("Press 'Run this trial' to see each step.")
    st.stop()
rec, previews = shown
fmri = subj.test_fmri[idx]

st.header("1. The fMRI pattern")
st.write(f"{fmri.size} nsdgeneral voxels, z-scored with the training statistics (mean {fmri.mean():.2f}, "
         f"sd {fmri.std():.2f}); repeats of the image averaged.")
_surface_view.show_pattern(ctx.nsd_root, subject, fmri, key="walk", value_label="z",
                           title=f"trial {image_id}: left | right hemisphere")

st.header("2. Predicted VDVAE latents -> stage 1")
vd = rec.features["vdvae"]
st.write(f"A ridge decoder predicts {vd.size:,} VDVAE latent values (the first latent layers); the later layers "
         "are sampled from the prior and the VDVAE decoder draws a low-resolution layout.")
l, r = st.columns([2, 1])
l.line_chart(vd[: min(vd.size, 2000)], height=200)
r.image(rec.stage1_upscaled, caption=f"stage 1 ({rec.stage1.shape[0]} px, upscaled)", width="stretch")

st.header("3. Predicted CLIP features")
st.write("Two more ridge decoders predict CLIP-text (77 tokens) and CLIP-vision (257 tokens) embeddings; "
         "they steer the diffusion. Rows: tokens, columns: embedding dimensions.")
import plotly.express as px  # noqa: E402

t, v = st.columns(2)
t.plotly_chart(px.imshow(rec.features["clip_text"], aspect="auto", color_continuous_scale="RdBu_r",
                         title="CLIP-text (77 x d)"), key="walk_clip_text")
v.plotly_chart(px.imshow(rec.features["clip_vision"], aspect="auto", color_continuous_scale="RdBu_r",
                         title="CLIP-vision (257 x d)"), key="walk_clip_vision")
st.write("What the predicted features are closest to among this subject's test images, embedded by the "
         "bundle's own CLIP (cosine of the flattened tokens, after subtracting the test set's mean feature): "
         "when decoding carries the image's meaning, the true image ranks near the top; by chance it ranks "
         "about halfway.")
banks, banks_note = _state.clip_banks(ctx.bundle_path, ctx.nsd_root, subject, ctx.device)
if banks is None:
    st.info(f"Nearest captions and images are not available: {banks_note}.")
else:
    true_rows = np.flatnonzero(banks["ids"] == image_id)
    true_row = int(true_rows[0]) if true_rows.size else -1
    n_bank = len(banks["ids"])
    t, v = st.columns(2)
    for col, name, bank, what in ((t, "clip_text", banks["text"], "captions"),
                                  (v, "clip_vision", banks["vision"], "images")):
        label = "CLIP-text" if name == "clip_text" else "CLIP-vision"
        col.subheader(f"Nearest test {what} to the predicted {label} features")
        try:
            rows, cos = neighbours.nearest(rec.features[name], bank, k=5)
            rank = neighbours.rank_of(rec.features[name], bank, true_row) if true_row >= 0 else None
        except ValueError as err:
            col.warning(f"Cannot compare the predicted {label} features with the bank: {err}")
            continue
        if name == "clip_text":
            col.markdown("\n".join(
                f"{n}. `{c:+.3f}` {banks['captions'][r][0]}" + (" **<- true image**" if r == true_row else "")
                for n, (r, c) in enumerate(zip(rows, cos), start=1)))
        else:
            for tc, r, c in zip(col.columns(len(rows)), rows, cos):
                tc.image(subj.image(int(banks["ids"][r])), width="stretch",
                         caption=f"{c:+.3f}" + (" (true)" if r == true_row else ""))
        if rank is None:
            col.caption(f"The true image (73k id {image_id}) is not in the bank of {n_bank} test images.")
        else:
            subject_words = "The true image's captions rank" if name == "clip_text" else "The true image ranks"
            col.caption(f"{subject_words} {rank} of {n_bank}.")

st.header("4. Diffusion steps")
st.write(f"Versatile Diffusion starts from the stage-1 image with noise added and runs "
         f"{rec.settings['denoising_steps']} DDIM steps guided by the predicted CLIP features.")
if previews:
    cols = st.columns(len(previews))
    for col, (step, img) in zip(cols, previews):
        col.image(img, caption=f"step {step}", width="stretch")

st.header("5. Final reconstruction")
o, f = st.columns(2)
o.image(subj.image(image_id), caption=f"original (73k id {image_id})", width="stretch")
f.image(rec.final, caption=f"final (seed {rec.seed})", width="stretch")
st.download_button("Download final (PNG)", _views.png_bytes(rec.final), file_name=f"walkthrough_nsd{image_id}.png",
                   mime="image/png", key="walk_dl")
