"""The app's one adapter to the library: where the bundle and the NSD tree come from, and cached loaders.

Pages never build models or read NSD files themselves: they call :func:`context` for the sidebar's choices
and :func:`diffuser` / :func:`subject_data` / :func:`surface_map` for the loaded objects.

Sources
-------
* ``demo`` (default): the MiniNSD world (:func:`brain_diffuser_core.world.build.ensure_world`) and its demo
  bundle (:func:`brain_diffuser_core.world.demo.ensure_demo_bundle`), built into the cache on first use under a
  progress bar (:func:`demo_sources_with_progress`).
* ``folder``: a bundle folder plus the NSD root holding the subjects' data (real NSD or a world tree).

Cached resources (``st.cache_resource``) take explicit arguments only; they are shared by every session, and
the generative models serialise generations with their own ``lock``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from brain_diffuser_core.config import PAPER, cache_root

AVERAGE = "average"
QUEUE_HEARTBEAT_S = 1.0  # seconds between place-in-queue updates of a waiting generation
CONTEXT_KEY = "app_context"


@dataclass(frozen=True)
class AppContext:
    """The sidebar's choices, as pages read them.

    bundle_path, nsd_root : str folders (absolute).
    subject : int (1, 2, 5, 7) or :data:`AVERAGE` (only on pages where the subject average applies).
    subjects : the bundle's subjects that the pages may use.
    device : "auto", "cpu" or "cuda".
    seed : base seed (``seed_for(..., base_seed=seed)``).
    num_inference_steps : DDIM schedule length (the paper's 50 by default; strength picks how many run).
    demo_note : "" or why the demo's images are not meaningful (untrained demo models, development stand-in).
    """

    bundle_path: str
    nsd_root: str
    subject: int | str
    subjects: tuple[int, ...]
    device: str
    seed: int
    num_inference_steps: int
    demo_note: str = ""
    presenter: bool = False  # this session presents (brain_diffuser_core.presenter.is_presenter) and does not follow
    following: bool = False  # this session follows the presenter (its widgets take the presenter's values)

    @property
    def single_subjects(self) -> tuple[int, ...]:
        """Subjects a pattern is made for: all bundle subjects for the average, else the chosen one."""
        return self.subjects if self.subject == AVERAGE else (int(self.subject),)


def context() -> AppContext:
    """The context ``app.py`` stored for this run; stops the page with a message when there is none."""
    ctx = st.session_state.get(CONTEXT_KEY)
    if ctx is None:
        st.error("This page runs inside the app: start it with `make run` (streamlit run app.py).")
        st.stop()
    return ctx


# ------------------------------------------------------------------------------------------------ sources
_DEMO_BUILD_LOCK = threading.Lock()  # two first visitors must not build the same demo twice at once
UNTRAINED_NOTE = ("The demo models are not trained yet (random weights of the real architectures): decoding runs end "
                  "to end but images are not meaningful. Train them with `python -m brain_diffuser_core world train`.")


def build_demo_sources(progress=None) -> tuple[str, str, str]:
    """(bundle folder, NSD root of the world, note) of the built-in demo, built into the cache when missing.

    progress : callable(step: str, done: int, total: int) for the world build and the bundle fit, or None.
    ``note`` is "" for trained demo models, else :data:`UNTRAINED_NOTE`. A full disk raises
    :class:`~brain_diffuser_core.world.demo.DemoDiskFullError` naming the cache; corrupt or missing demo
    weights raise :class:`~brain_diffuser_core.world.demo.DemoModelsError` naming the files and the fix.
    """
    from brain_diffuser_core.world import demo
    from brain_diffuser_core.world.build import ensure_world

    with _DEMO_BUILD_LOCK, demo.explain_disk_full(cache_root()):
        root = Path(ensure_world(progress=progress)).resolve()
        bundle = Path(demo.ensure_demo_bundle(world_root=root, progress=progress)).resolve()
    note = UNTRAINED_NOTE if demo.UNTRAINED_KEY in load_bundle_cached(str(bundle)).manifest.get("models", {}) else ""
    return str(bundle), str(root), note


@st.cache_resource(show_spinner="Checking the MiniNSD demo...")
def demo_sources() -> tuple[str, str, str]:
    """:func:`build_demo_sources` once per process (its result is shared by every session)."""
    return build_demo_sources()


def demo_sources_with_progress() -> tuple[str, str, str]:
    """:func:`demo_sources`; the first call of a process builds or checks the demo under a progress bar
    (a fresh machine builds the world and fits its decoders: about a minute on CPU)."""
    if not _DEMO_CHECKED:
        bar = st.progress(0.0, text="Preparing the MiniNSD demo (first run: builds the world and fits its decoders)")

        def show(step: str, done: int, total: int) -> None:
            bar.progress(min(done / max(total, 1), 1.0), text=f"Preparing the MiniNSD demo: {step} ({done}/{total})")

        build_demo_sources(progress=show)
        bar.empty()
        _DEMO_CHECKED.append(True)
    return demo_sources()


_DEMO_CHECKED: list = []  # non-empty once this process has built or checked the demo


def folder_policy():
    """The :class:`~brain_diffuser_core.access.FolderPolicy` for this server: streamlit's ``server.address``
    decides (loopback: any folder; beyond: only the allowed roots, ``$BRAIN_DIFFUSER_ROOTS``)."""
    from brain_diffuser_core.access import FolderPolicy

    return FolderPolicy(st.get_option("server.address"))


def check_folder_sources(bundle_text: str, nsd_text: str, policy=None):
    """Validate the sidebar's folder inputs; returns (Bundle, nsd_root Path).

    policy : a :class:`~brain_diffuser_core.access.FolderPolicy` (default: :func:`folder_policy`); a refused
        folder raises its AccessError (a ValueError) before anything is read from it.
    Raises ValueError naming the input, what was expected and what was found.
    """
    from brain_diffuser_core.bundle import BundleError

    policy = folder_policy() if policy is None else policy
    bundle_text, nsd_text = (bundle_text or "").strip(), (nsd_text or "").strip()
    if not bundle_text:
        raise ValueError("'Bundle folder' must be a folder holding manifest.json; nothing was entered")
    folder = policy.bundle_folder(bundle_text)
    if not folder.is_dir():
        raise ValueError(f"'Bundle folder' must be an existing folder; {str(folder)!r} does not exist")
    if not (folder / "manifest.json").is_file():
        raise ValueError(f"'Bundle folder' must hold manifest.json (made by `python -m brain_diffuser_core fit`); "
                         f"{str(folder)!r} has none")
    try:
        bundle = load_bundle_cached(str(folder.resolve()))
    except BundleError as err:
        raise ValueError(f"'Bundle folder' is not a usable bundle: {err}") from None
    if not nsd_text:
        raise ValueError("'NSD root' must be the folder holding nsddata/, nsddata_betas/ and nsddata_stimuli/; "
                         "nothing was entered")
    root = policy.nsd_root(nsd_text)
    if not (root / "nsddata").is_dir():
        raise ValueError(f"'NSD root' must hold an nsddata/ folder; {str(root)!r} has none")
    return bundle, root.resolve()


# ------------------------------------------------------------------------------------------------ loaders
@st.cache_resource(show_spinner="Reading the bundle manifest...", max_entries=4)
def load_bundle_cached(bundle_path: str):
    from brain_diffuser_core.bundle import load_bundle

    return load_bundle(bundle_path)


@st.cache_resource(show_spinner="Loading decoders and generative models...", max_entries=2)
def diffuser(bundle_path: str, device: str = "auto"):
    """:class:`~brain_diffuser_core.pipeline.BrainDiffuser` for a bundle folder on ``device`` (shared)."""
    from brain_diffuser_core.pipeline import BrainDiffuser

    log_queue_events()
    bd = BrainDiffuser(bundle_path, device=device)
    # a queued page hears its place again every second: a user who left while waiting is then noticed (Streamlit
    # stops the script at its next element update) and the queue drops that ticket
    bd.models.lock.heartbeat_s = QUEUE_HEARTBEAT_S
    return bd


def log_queue_events() -> None:
    """Send the generation queue's INFO lines (ticket drawn / runs / withdrawn / done, with the queue length) to
    the server's stderr, once per process: the log shows what happened to a user who left while queued."""
    import logging

    log = logging.getLogger("brain_diffuser_core.pipeline")
    if not any(getattr(h, "bde_queue", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.bde_queue = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


@st.cache_resource(show_spinner="Reading the subject's fMRI...", max_entries=8)
def subject_data(nsd_root: str, subject: int):
    """:class:`~brain_diffuser_core.nsd.Subject` (prepared fMRI, stimuli, captions, ROIs), cached on disk too."""
    from brain_diffuser_core.nsd import load_subject

    return load_subject(nsd_root, int(subject), progress=False)


@st.cache_resource(show_spinner="Placing the voxels on the surface...", max_entries=8)
def surface_map(nsd_root: str, subject: int):
    """(SurfaceMap or None, why not): the subject's voxel -> fsaverage5 map from NSD's transform files (real NSD
    and the MiniNSD world alike; cached on disk too), or None with the message naming the missing or bad files
    (the pages then show the voxel-space view). See :mod:`brain_diffuser_core.nsd_surface`."""
    from brain_diffuser_core import nsd_surface
    from brain_diffuser_core.nsd import NSDFormatError
    from brain_diffuser_core.nsd_format import NSDPaths

    subj = subject_data(nsd_root, subject)
    try:
        return nsd_surface.load_surface_map(NSDPaths(nsd_root, subject), subj.voxel_ijk, subj.volume_shape), ""
    except (FileNotFoundError, NSDFormatError) as err:
        return None, str(err)


@st.cache_resource(max_entries=8)
def hemispheres(nsd_root: str, subject: int) -> tuple[np.ndarray, str]:
    """(str (n_voxels,) "left"/"right", note): from ``roi/{lh,rh}.nsdgeneral.nii.gz``; when those are missing or
    bad, from the sign of x in the nominal affine, with a note saying so (approximate on real NSD data)."""
    from brain_diffuser_core import nsd_surface, surface
    from brain_diffuser_core.nsd import NSDFormatError
    from brain_diffuser_core.nsd_format import NSDPaths

    subj = subject_data(nsd_root, subject)
    try:
        return nsd_surface.hemispheres_from_nsdgeneral(NSDPaths(nsd_root, subject), subj.voxel_ijk), ""
    except (FileNotFoundError, NSDFormatError) as err:
        return surface.hemispheres_from_affine(subj.voxel_ijk, subj.affine), (
            f"{err}. Left/right comes from the sign of x in the volume's affine instead, which is only nominal for "
            "NSD's func1pt8mm data: the split is approximate.")


def hemisphere_of_voxels(nsd_root: str, subject: int) -> np.ndarray:
    """str (n_voxels,) "left"/"right" of the subject's voxels (see :func:`hemispheres`)."""
    return hemispheres(nsd_root, subject)[0]


def stage2_defaults() -> dict:
    """The paper's stage-2 defaults the pages start from (strength, guidance, mix)."""
    s2 = PAPER.stage2
    return {"strength": s2.strength, "guidance_scale": s2.guidance_scale, "vision_mix": s2.vision_mix}


# ------------------------------------------------------------------------------------------------ serving
THREADS_ENV = "BRAIN_DIFFUSER_THREADS"


def default_cpu_threads() -> int:
    """torch CPU threads for generation: ``$BRAIN_DIFFUSER_THREADS`` if set, else half the cores (at least 1).

    Why not every core: the server, the browser (often on the same laptop) and the other sessions need some;
    on this project's 2-core machines torch on both cores beside them made one reconstruction 20-70x slower
    (``benchmarks/app_latency.py`` with and without ``--threads 1``).
    """
    import os

    from brain_diffuser_core.limits import env_number

    return env_number(THREADS_ENV, max(1, (os.cpu_count() or 2) // 2))


@st.cache_resource
def configure_cpu_threads() -> int:
    """Set torch's CPU threads once per process (:func:`default_cpu_threads`); returns the number."""
    import torch

    n = default_cpu_threads()
    torch.set_num_threads(n)
    return n


def wait_label(position: int, running: str) -> str:
    """Status label for a generation's place in the shared queue: ``running`` when it is its turn (0)."""
    if position <= 0:
        return running
    return f"Waiting: {position} generation{'s' if position != 1 else ''} ahead of you"


def queue_reporter(status, running: str):
    """``on_wait(position)`` for :meth:`GenerativeModels.generate`: shows the caller's place in ``status``
    (an ``st.status`` container) while it waits for the shared models, then ``running``."""
    def on_wait(position: int) -> None:
        status.update(label=wait_label(position, running), state="running")
    return on_wait


@st.cache_resource
def server_cache_pool():
    """The byte budget every session's result caches share (``$BRAIN_DIFFUSER_SERVER_CACHE_MB``, default 1 GiB):
    past it the least recently used results of any session are evicted. One per server process."""
    from brain_diffuser_core import limits

    return limits.BytePool(limits.env_mib(limits.SERVER_CACHE_ENV, limits.DEFAULT_SERVER_CACHE_MB))


def session_cache(name: str):
    """This session's result cache ``name`` (a :class:`~brain_diffuser_core.limits.ByteLRU` in session state):
    bounded in bytes (``$BRAIN_DIFFUSER_SESSION_CACHE_MB``, default 128 MiB) and by the server's pool; the
    least recently used results are evicted first. Read entries with ``get`` (another session may evict)."""
    from brain_diffuser_core import limits

    cache = st.session_state.get(name)
    if not isinstance(cache, limits.ByteLRU):
        max_bytes = limits.env_mib(limits.SESSION_CACHE_ENV, limits.DEFAULT_SESSION_CACHE_MB)
        cache = st.session_state[name] = limits.ByteLRU(max_bytes, pool=server_cache_pool())
    return cache


def upload_limit_bytes() -> int:
    """Largest upload (``$BRAIN_DIFFUSER_UPLOAD_MB``, default 16 MiB), checked by :func:`refuse_upload`."""
    from brain_diffuser_core import limits

    return limits.env_mib(limits.UPLOAD_MB_ENV, limits.DEFAULT_UPLOAD_MB)


def upload_limit_mb() -> int:
    """:func:`upload_limit_bytes` in whole MiB (at least 1) for ``st.file_uploader(max_upload_size=...)``: the
    browser then refuses bigger files before sending them."""
    import math

    return max(1, math.ceil(upload_limit_bytes() / 2**20))


def refuse_upload(upload) -> str:
    """"" when this session may use ``upload`` (an ``st.file_uploader`` file), else why not: over the size limit,
    or one upload too many in a minute from this session (``$BRAIN_DIFFUSER_UPLOADS_PER_MINUTE``, default 10)."""
    from brain_diffuser_core import limits

    gate = st.session_state.get("upload_gate")
    if not isinstance(gate, limits.UploadGate):
        per_minute = limits.env_number(limits.UPLOADS_PER_MINUTE_ENV, limits.DEFAULT_UPLOADS_PER_MINUTE)
        gate = st.session_state["upload_gate"] = limits.UploadGate(upload_limit_bytes(), per_minute)
    try:
        gate.check(upload.file_id, upload.name, upload.size)
    except limits.UploadRefused as err:
        return str(err)
    return ""


def strip_features(rec):
    """A copy of a Reconstruction without its feature arrays (about 1 MB each), for per-session caches."""
    from dataclasses import replace

    return replace(rec, features={})


@st.cache_resource(show_spinner="Embedding the test captions and images with the bundle's CLIP...", max_entries=4)
def clip_banks(bundle_path: str, nsd_root: str, subject: int, device: str = "auto") -> tuple[dict | None, str]:
    """The bundle's CLIP features of ``subject``'s test images and captions, for nearest-neighbour views.

    Returns (banks, "") with banks = {"ids": int64 (N,) 73k ids in test order, "captions": list of N caption
    lists, "text": float32 (N, 77, D), "vision": float32 (N, 257, D), "clip": where the CLIP came from}, or
    (None, why not) when the bundle names no CLIP, it cannot be loaded, or the subject has no captions.
    See :mod:`brain_diffuser_core.neighbours`.
    """
    from brain_diffuser_core import neighbours
    from brain_diffuser_core.features.clip import ClipFeatureExtractor
    from brain_diffuser_core.pipeline import resolve_device

    where = load_bundle_cached(bundle_path).clip_location()
    if where is None:
        return None, "the bundle names no CLIP model ('clip' or 'versatile_diffusion' in its manifest)"
    try:
        extractor = ClipFeatureExtractor.from_pretrained(where, device=resolve_device(device))
    except (OSError, ValueError) as err:
        return None, f"the bundle's CLIP ({where}) could not be loaded ({str(err).splitlines()[0]})"
    subj = subject_data(nsd_root, subject)
    ids = np.asarray(subj.test_image_ids, dtype=np.int64)
    try:
        captions = [subj.captions(int(i)) for i in ids]
    except FileNotFoundError as err:
        return None, f"subject {subject} has no captions ({err})"
    empty = [int(i) for i, c in zip(ids, captions) if not c]
    if empty:
        return None, f"every test image needs a caption; {len(empty)} have none (first: 73k id {empty[0]})"
    text = neighbours.caption_bank(extractor, captions)
    vision = neighbours.image_bank(extractor, np.stack([subj.image(int(i)) for i in ids]))
    return {"ids": ids, "captions": captions, "text": text, "vision": vision, "clip": where}, ""


# ------------------------------------------------------------------------------------------------ presenter
FOLLOW_KEY = "follow_presenter"  # the toggle's widget key
_FOLLOW_ON = "follow_presenter_on"  # its value kept outside the widget: a page switch resets widget state
FOLLOW_POLL_S = 2.0  # seconds between a follower's checks for the presenter's changes
FRAME_SCENE = "frame"  # the sidebar's choices and the presenter's page


@st.cache_resource
def presenter_stage():
    """The server-wide :class:`~brain_diffuser_core.presenter.Stage` (one per process, shared by every session)."""
    from brain_diffuser_core.presenter import Stage

    return Stage()


def following() -> bool:
    """Whether this session follows the presenter (the sidebar's toggle, :func:`follow_toggle`)."""
    return bool(st.session_state.get(_FOLLOW_ON))


def follow_toggle(help: str) -> bool:
    """The "Follow the presenter" toggle; returns :func:`following`. Its value survives the page switch that
    following the presenter's page makes (widget state alone does not)."""
    st.session_state[FOLLOW_KEY] = following()

    def changed() -> None:
        st.session_state[_FOLLOW_ON] = bool(st.session_state[FOLLOW_KEY])

    st.toggle("Follow the presenter", key=FOLLOW_KEY, on_change=changed, help=help)
    return following()


def follow_scene(name: str, keys) -> bool:
    """When this session follows the presenter, set its widget values ``keys`` to the presenter's ones of scene
    ``name`` (call before those widgets exist); returns whether it follows."""
    if not following():
        return False
    values = presenter_stage().scene(name).values
    for k in keys:
        if k in values:
            st.session_state[k] = values[k]
    return True


def publish_scene(name: str, values: dict) -> None:
    """The presenter's widget values of scene ``name``, for the followers (no-op for other sessions)."""
    ctx = st.session_state.get(CONTEXT_KEY)
    if ctx is not None and ctx.presenter:
        presenter_stage().publish(name, values)


def publish_result(name: str, key, result) -> None:
    """The presenter's latest result of scene ``name`` (computed for ``key``), shared with every session whose own
    key matches (no-op for other sessions)."""
    ctx = st.session_state.get(CONTEXT_KEY)
    if ctx is not None and ctx.presenter:
        presenter_stage().publish_result(name, key, result)


def shared_result(name: str, key):
    """The presenter's result of scene ``name`` if it was computed for ``key`` (this session's own settings),
    else None: the same generation is not run again."""
    return presenter_stage().result(name, key)


@st.fragment(run_every=FOLLOW_POLL_S)
def _watch_presenter(names: tuple[str, ...], seen: tuple[int, ...]) -> None:
    if tuple(presenter_stage().version(n) for n in names) != seen:
        st.rerun()  # the whole app: the follower's widgets take the presenter's new values


def watch_presenter(names: tuple[str, ...]) -> None:
    """For a follower: rerun the app when the presenter changes one of the scenes ``names`` (checked every
    :data:`FOLLOW_POLL_S` seconds by a fragment that draws nothing)."""
    _watch_presenter(tuple(names), tuple(presenter_stage().version(n) for n in names))
