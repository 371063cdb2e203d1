"""Evaluation: the paper's metrics for the chosen bundle and subject beside the published rows, per-trial
distributions, and the best and worst trials. Computed once per settings (kept in the cache), with progress."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from brain_diffuser_core.config import cache_root
from brain_diffuser_core.download import missing_data_hint
from brain_diffuser_core.evaluation import VARIANTS, evaluate_bundle
from brain_diffuser_core.export import (comparison_rows, evaluation_folder, higher_is_better, load_evaluation,
                                        rank_trials)
from brain_diffuser_core.metrics import format_table, network_spec
from pages import _state

VARIANT_LABELS = {"full": "full (stage 1 + stage 2)", "stage1": "stage 1 only (VDVAE)",
                  "stage2_only": "stage 2 only (no VDVAE guess)"}
NETWORKS = ("clip", "efficientnet_lite0")  # the feature networks this project installs (metrics.py)
CPU_DEFAULT_TRIALS = 24

ctx = _state.context()
bd = _state.diffuser(ctx.bundle_path, ctx.device)
subject = int(ctx.subject)
try:
    subj = _state.subject_data(ctx.nsd_root, subject)
except FileNotFoundError as err:  # a folder bundle's NSD root without the subject's files
    st.error(missing_data_hint(ctx.nsd_root, subject, err))
    st.stop()
n_test = len(subj.test_image_ids)

st.title("Evaluation")
st.caption(f"Subject {subject}: the paper's metrics on the first N of its {n_test} test images, for the paper's "
           "three variants, beside the published Table 1. Computed once per bundle, subject and settings, then "
           "reloaded from the cache.")
if ctx.demo_note:
    st.warning(ctx.demo_note)

# 1. Settings (each combination is its own cached evaluation)
c1, c2, c3, c4 = st.columns(4)
default_n = n_test if bd.device.type == "cuda" else min(CPU_DEFAULT_TRIALS, n_test)
n_trials = int(c1.number_input(f"Test trials (2-{n_test})", min_value=2, max_value=n_test, value=default_n, step=1,
                               key="eval_n", help="The first N test images. All of them on a GPU; a few on CPU."))
chosen = c2.multiselect("Variants", list(VARIANTS), default=list(VARIANTS), key="eval_variants",
                        format_func=VARIANT_LABELS.get)
variants = [v for v in VARIANTS if v in chosen]  # the paper's order whatever the click order
networks = c3.multiselect("Feature networks", list(NETWORKS), default=list(NETWORKS), key="eval_networks",
                          format_func=lambda n: network_spec(n).label,
                          help="High-level columns: CLIP 2-way identification, EfficientNet-Lite0 correlation "
                               "distance (a stand-in for the paper's EffNet-B1, marked *).")
paper = c4.toggle("Paper mode", key="eval_paper",
                  help="Reproduce the original scripts step for step (test-set z-score, start noise t=741, grey "
                       "127, truncated images, 224 px bilinear network inputs, the published column-wise SSIM). "
                       "Off: the project's improvements (README, 'Where this differs').")
rescale = c4.selectbox("Prediction rescaling", ["train", "paper"], key="eval_rescale", disabled=paper,
                       help="train: leave-one-out train statistics (serves single trials); paper: z-score across "
                            "the whole test set, as the original code (always, in paper mode).")
rescale = "paper" if paper else rescale
if not variants:
    st.info("Choose at least one variant.")
    st.stop()
settings = {"rows": list(range(n_trials)), "variants": variants, "networks": list(networks), "rescale": rescale,
            "paper": paper, "base_seed": ctx.seed, "num_inference_steps": ctx.num_inference_steps, "format": 2}
folder = evaluation_folder(cache_root(), ctx.bundle_path, subject, settings)


@st.cache_data(show_spinner=False, max_entries=16)
def load_results(folder: str, stamp: float):
    """The evaluation in ``folder`` (``stamp``: metrics.json's mtime, so a recomputed folder is read again)."""
    return load_evaluation(folder)


def results_stamp() -> float:
    path = folder / "metrics.json"
    return path.stat().st_mtime if path.is_file() else 0.0


res = load_results(str(folder), results_stamp())

# 2. Compute (resumable: images already made are kept)
if res is None:
    made = sum(len(list((folder / "images" / v).glob("*.png"))) for v in variants if (folder / "images" / v).is_dir())
    total = n_trials * len(variants)
    label = "Run evaluation" if not made else f"Resume evaluation ({made} of {total} images made)"
    if not st.button(label, type="primary", key="eval_run"):
        st.info(f"Not computed yet for these settings: {total} reconstructions ({n_trials} trials x "
                f"{len(variants)} variants, {ctx.num_inference_steps}-step schedule), then scoring.")
        st.stop()
    status = st.status("Evaluating...", expanded=True)
    bar = status.progress(0.0, text="starting")
    done_by_variant: dict[str, int] = {}

    def progress(variant: str, done: int, of: int) -> None:
        done_by_variant[variant] = done
        made_now = sum(done_by_variant.values())
        bar.progress(min(made_now / total, 1.0), text=f"{variant}: {done} of {of} images ({made_now} of {total})")
        if made_now >= total:
            status.update(label="Scoring (PixCorr, SSIM, feature networks)...")

    network_kwargs = {"clip": {"path": bd.bundle.clip_location(), "device": str(bd.device)},
                      "efficientnet_lite0": {"device": str(bd.device)}}
    try:
        with bd.models.lock.report_to(_state.queue_reporter(status, "Evaluating...")):
            evaluate_bundle(bd, subj, folder, rows=settings["rows"], variants=variants, networks=networks,
                            network_kwargs=network_kwargs, base_seed=ctx.seed, rescale=rescale, batch_size=4,
                            progress=progress, paper=paper, num_inference_steps=ctx.num_inference_steps)
    except (ValueError, RuntimeError, ImportError, OSError) as err:
        status.update(label="Evaluation failed", state="error")
        st.error(f"The evaluation failed: {err}. Images made so far are kept in {folder} and reused next time.")
        st.stop()
    status.update(label=f"Evaluated {n_trials} trials x {len(variants)} variants", state="complete", expanded=False)
    res = load_results(str(folder), results_stamp())
else:
    st.caption(f"Loaded from the cache: `{folder}`")

# 3. The table beside the published rows
st.header("Metrics beside the paper")
tag = ", paper mode" if paper else ""
st.markdown(format_table({f"ours ({v}{tag}) subj {subject}": res.summary[v] for v in res.variants}))
st.caption("2-way identification in % (chance 50 %); PixCorr, SSIM higher is better; EffNet/SwAV are correlation "
           f"distances (lower is better). {len(res.image_ids)} test images; the paper uses all 982. SSIM both ways: "
           "true 2-D SSIM and the published one (the mean of 1-D SSIMs down the image columns, as the original's "
           f"scikit-image call computed it); {'paper' if paper else 'improved'} mode's own is the SSIM column.")
d1, d2 = st.columns(2)
d1.download_button("Download the means (CSV)", (folder / "metrics.csv").read_bytes(),
                   file_name=f"subj{subject:02d}_metrics.csv", mime="text/csv", key="eval_dl_metrics",
                   on_click="ignore")
d2.download_button("Download per-trial values (CSV)", (folder / "per_image.csv").read_bytes(),
                   file_name=f"subj{subject:02d}_per_trial.csv", mime="text/csv", key="eval_dl_per_trial",
                   on_click="ignore")

# 4. One bar chart per metric: our variants vs published rows
comp = pd.DataFrame(comparison_rows(res.summary))
cols = st.columns(2)
for k, metric in enumerate(res.metrics):
    df = comp[comp.metric == metric]
    note = "" if df[df.source == "published"].comparable.all() else " (grey: paper's net, not comparable)"
    direction = "higher is better" if higher_is_better(metric) else "lower is better"
    fig = px.bar(df, x="method", y="value", color="source", title=f"{metric}, {direction}{note}",
                 color_discrete_map={"ours": "#1f77b4", "published": "#bbbbbb"})
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10), xaxis_title=None, showlegend=False)
    cols[k % 2].plotly_chart(fig, key=f"eval_bar_{metric}")

# 5. Per-trial distributions
st.header("Per-trial distributions")
long = pd.DataFrame([{"variant": v, "metric": m, "value": float(x), "image_id": int(i)}
                     for v in res.variants for m in res.metrics
                     for i, x in zip(res.image_ids, res.per_trial[v][m])])
fig = px.box(long, x="variant", y="value", color="variant", facet_col="metric", points="all",
             hover_data=["image_id"])
fig.update_yaxes(matches=None, showticklabels=True)
fig.update_layout(height=360, showlegend=False, margin=dict(l=10, r=10, t=40, b=10))
st.plotly_chart(fig, key="eval_distributions")

# 6. Best and worst trials
st.header("Best and worst trials")
r1, r2, r3 = st.columns(3)
metric = r1.selectbox("By per-trial metric", res.metrics, key="eval_rank_metric")
variant = r2.selectbox("Variant", res.variants, key="eval_rank_variant", format_func=VARIANT_LABELS.get)
k = int(r3.slider("Trials shown", 1, min(8, len(res.image_ids)), min(4, len(res.image_ids)), key="eval_k"))
values = res.per_trial[variant][metric]
higher = higher_is_better(metric)
for title, best in (("Best", True), ("Worst", False)):
    st.subheader(f"{title} {k} by {metric} ({variant})")
    picks = rank_trials(values, k, best=best, higher=higher)
    grid = st.columns(min(4, max(len(picks), 1)) * 2)
    for n, idx in enumerate(picks):
        image_id = int(res.image_ids[idx])
        c = 2 * (n % (len(grid) // 2))
        grid[c].image(subj.image(image_id), caption=f"{image_id}: original", width="stretch")
        grid[c + 1].image(str(res.images[variant][idx]), caption=f"{image_id}: {metric} = {values[idx]:.3f}",
                          width="stretch")
