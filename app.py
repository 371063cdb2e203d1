"""Brain-Diffuser Explorer: the app's frame (navigation and sidebar). No science here.

Start with ``make run`` (``streamlit run app.py``). The sidebar chooses the bundle (the built-in MiniNSD demo
by default, or a folder holding a real one plus its NSD root), the subject, the device and the base seed; the
pages read these through ``pages/_state.py``. Setting ``BRAIN_DIFFUSER_BUNDLE`` (and ``BRAIN_DIFFUSER_NSD_ROOT``)
before starting preselects a folder bundle, e.g. a lab's own fit of real NSD data.
"""
from __future__ import annotations

import os

import streamlit as st

from brain_diffuser_core.config import PAPER
from pages import _state

st.set_page_config(page_title="Brain-Diffuser Explorer", layout="wide")

# url paths differ from the file names on purpose: Streamlit's legacy "pages/ folder" mode (still applied to
# the first run of a process, and to every AppTest run) maps a request to pages/<name>.py by file name and
# would run that page without this frame; a name it does not know falls back to this script instead.
PAGES = [
    st.Page("pages/roi_designer.py", title="ROI designer", icon=":material/neurology:", default=True,
            url_path="roi-designer"),
    st.Page("pages/browse.py", title="Browse trials", icon=":material/photo_library:", url_path="trials"),
    st.Page("pages/walkthrough.py", title="Walkthrough", icon=":material/route:", url_path="step-by-step"),
    st.Page("pages/evaluation.py", title="Evaluation", icon=":material/analytics:", url_path="evaluate"),
]
#: pages (titles) on which the subject average (mean of the subjects' predicted features) applies
AVERAGE_PAGES = {"ROI designer"}

page = st.navigation(PAGES)
sb = st.sidebar
sb.title("Brain-Diffuser Explorer")

# 0. Lab meeting: who presents, and whether this session follows the presenter (pages/_state.py, "presenter")
from brain_diffuser_core import access, presenter  # noqa: E402

loopback = access.is_loopback(st.get_option("server.address"))
with sb.expander("Lab meeting", expanded=_state.following()):
    if presenter.presenter_token():
        entered_token = st.text_input("Presenter token", type="password", key="presenter_token",
                                      help="The presenter's token ($BRAIN_DIFFUSER_PRESENTER_TOKEN): students leave "
                                           "it empty.")
    else:
        entered_token = ""
    is_presenter = presenter.is_presenter(entered_token, loopback=loopback)
    following = _state.follow_toggle(
        help="Your page, trial, pattern and settings follow the presenter's, and the presenter's "
             "results are shown without running them again. Turn off to explore on your own.")
    if is_presenter and not following:
        st.caption("You present: students who follow see your page, settings and results.")
    elif following and not _state.presenter_stage().version(_state.FRAME_SCENE):
        st.caption("The presenter has not shown anything yet." if presenter.presenter_token() or loopback else
                   "No one can present on this server: the presenter sets $BRAIN_DIFFUSER_PRESENTER_TOKEN before "
                   "starting the app.")
FRAME_KEYS = ("bundle_source", "bundle_folder", "nsd_root_folder", "subject", "seed", "num_inference_steps")
if _state.follow_scene(_state.FRAME_SCENE, FRAME_KEYS):
    shown = _state.presenter_stage().scene(_state.FRAME_SCENE).values.get("page")
    target = [p for p in PAGES if p.title == shown]
    if target and shown != page.title:
        st.switch_page(target[0])

# 1. Bundle and data ($BRAIN_DIFFUSER_BUNDLE / $BRAIN_DIFFUSER_NSD_ROOT preselect a folder bundle)
if os.environ.get("BRAIN_DIFFUSER_BUNDLE"):
    st.session_state.setdefault("bundle_source", "folder")
    st.session_state.setdefault("bundle_folder", os.environ["BRAIN_DIFFUSER_BUNDLE"])
    st.session_state.setdefault("nsd_root_folder", os.environ.get("BRAIN_DIFFUSER_NSD_ROOT", ""))
source = sb.radio("Bundle", ["demo", "folder"], key="bundle_source", horizontal=True,
                  format_func={"demo": "Demo (MiniNSD)", "folder": "Folder"}.get,
                  help="The demo runs everywhere on CPU. A folder is a bundle made by `python -m brain_diffuser_core "
                       "fit`, with the NSD root its subjects' data come from.")
demo_note = ""
if source == "folder":
    bundle_text = sb.text_input("Bundle folder", key="bundle_folder", placeholder="/path/to/bundle")
    nsd_text = sb.text_input("NSD root", key="nsd_root_folder", placeholder="/path/to/nsd")
    policy = _state.folder_policy()
    if policy.restricted:
        sb.caption("This server is shared beyond this computer: only folders the presenter allowed open.")
    try:
        bundle, nsd_root = _state.check_folder_sources(bundle_text, nsd_text, policy)
    except ValueError as err:
        sb.error(str(err))
        st.info("Enter a bundle folder and its NSD root in the sidebar, or choose the demo.")
        st.stop()
    bundle_path = str(bundle.path.resolve())
    nsd_root = str(nsd_root)
else:
    try:
        bundle_path, nsd_root, demo_note = _state.demo_sources_with_progress()
    except Exception as err:  # building the demo can fail (disk full, ...): say so, keep the app alive
        sb.error(f"The demo could not be prepared: {err}")
        st.stop()
    bundle = _state.load_bundle_cached(bundle_path)
    if demo_note:
        sb.warning(demo_note)

# 2. Subject
subjects = tuple(s for s in bundle.subjects)
options: list = list(subjects)
if page.title in AVERAGE_PAGES and len(subjects) > 1:
    options.append(_state.AVERAGE)
if st.session_state.get("subject") not in options:
    st.session_state.pop("subject", None)
subject = sb.selectbox("Subject", options, key="subject",
                       format_func=lambda s: "average of all subjects" if s == _state.AVERAGE else f"subject {s}")

# 3. Device, seed, schedule
import torch  # noqa: E402  (after the cheap widgets: the first import takes seconds)

try:
    cpu_threads = _state.configure_cpu_threads()
except ValueError as err:
    sb.error(str(err))
    st.stop()
devices = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
device = sb.selectbox("Device", devices, key="device", help="auto = the first CUDA GPU if present, else CPU")
seed = int(sb.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1, key="seed",
                           help="Base seed: each trial or pattern derives its own seed from it, so a result "
                                "reproduces alone."))
steps = int(sb.number_input("Diffusion schedule (DDIM steps)", min_value=2, max_value=200,
                            value=PAPER.stage2.num_inference_steps, step=1, key="num_inference_steps",
                            help="The paper uses 50; img2img runs the last strength x steps of them."))
try:
    bd = _state.diffuser(bundle_path, device)
except Exception as err:
    sb.error(f"The models of bundle {bundle_path} could not be loaded on {device!r}: {err}")
    st.stop()
threads_note = f" ({cpu_threads} CPU thread{'s' if cpu_threads != 1 else ''})" if bd.device.type == "cpu" else ""
sb.caption(f"Running on **{bd.device}**{threads_note} in **{str(bd.models.dtype).replace('torch.', '')}**; "
           f"bundle `{bundle.path.name}` (subjects {', '.join(map(str, subjects))}).")
queued = bd.models.lock.queue_length()  # the models are shared by every session, one generation at a time
if queued:
    sb.caption(f"{queued} generation(s) running or waiting on this server now.")

st.session_state[_state.CONTEXT_KEY] = _state.AppContext(
    bundle_path=bundle_path, nsd_root=nsd_root, subject=subject, subjects=subjects, device=device, seed=seed,
    num_inference_steps=steps, demo_note=demo_note, presenter=is_presenter and not following, following=following)
_state.publish_scene(_state.FRAME_SCENE, {**{k: st.session_state[k] for k in FRAME_KEYS if k in st.session_state},
                                                "page": page.title})
if following:
    with sb:
        _state.watch_presenter((_state.FRAME_SCENE, page.title))
page.run()
