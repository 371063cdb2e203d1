"""Data sources for the app's tests: a small MiniNSD world and a tiny random-weight bundle fitted to its voxel
counts (the real data and pipeline code paths, tiny models). Used by tests/test_app.py and tests/test_browser.py.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


def make_app_sources(tmp_path: str | Path) -> tuple[str, str, str]:
    """Build (bundle folder, world root, cache folder) under ``tmp_path``; all three are str paths.

    The world has subjects 1 and 2 (40 train and 6 test images, 12 test trials in all); the bundle holds tiny
    decoders for both subjects sharing one tiny model folder. ``cache`` is the prepared-fMRI cache the loaders
    used (pass it as ``cache_dir`` to :func:`brain_diffuser_core.nsd.load_subject`).
    """
    from brain_diffuser_core.bundle import SubjectDecoders, load_bundle, save_bundle
    from brain_diffuser_core.config import FEATURE_NAMES
    from brain_diffuser_core.nsd import load_subject
    from brain_diffuser_core.tiny_bundle import make_tiny_bundle
    from brain_diffuser_core.world.build import build_world

    tmp = Path(tmp_path)
    info = build_world(tmp / "world", n_train=40, n_test=6, subjects=(1, 2))
    cache = tmp / "cache"
    n_vox = {s: load_subject(info.root, s, cache_dir=cache, progress=False).n_voxels for s in (1, 2)}
    models = tmp / "models"
    main = make_tiny_bundle(tmp / "bundle", subjects=(1,), n_voxels=n_vox[1] - 1, models_folder=models)
    other = load_bundle(make_tiny_bundle(tmp / "bundle2", subjects=(2,), n_voxels=n_vox[2] - 2, models_folder=models))
    b = load_bundle(main)
    entry = SubjectDecoders(n_voxels=n_vox[2], mask_sha256="tiny-2",
                            decoders={f: other.decoder(2, f) for f in FEATURE_NAMES},
                            train_feature_norm={f: other.train_feature_norm(2, f) for f in FEATURE_NAMES})
    save_bundle(main, {2: entry}, feature_shapes={f: b.feature_shape(f) for f in FEATURE_NAMES},
                models=b.manifest["models"], update=True)
    return str(main), str(info.root), str(cache)


#: seconds per AppTest run: pages import torch, diffusers and nilearn on a loaded 2-core machine
APP_TIMEOUT = 120
#: DDIM schedule in app tests: strength 0.75 -> 3 denoising steps
APP_STEPS = 4


def make_app_test(sources: tuple[str, str, str], monkeypatch):
    """An AppTest of ``app.py`` on ``sources`` (a folder bundle + its world), with a per-test cache and the short
    test schedule; call ``.run()`` on it."""
    from streamlit.testing.v1 import AppTest

    bundle, world, cache = sources
    monkeypatch.setenv("BRAIN_DIFFUSER_CACHE", str(Path(cache).parent / "bde-cache"))
    # AppTest has no server.address (streamlit's default: every interface), so the allowed roots apply: the test
    # session's temporary folder holds the sources and each test's tmp_path
    monkeypatch.setenv("BRAIN_DIFFUSER_ROOTS", str(Path(bundle).resolve().parents[1]))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=APP_TIMEOUT)
    at.session_state["bundle_source"] = "folder"
    at.session_state["bundle_folder"] = bundle
    at.session_state["nsd_root_folder"] = world
    at.session_state["num_inference_steps"] = APP_STEPS
    return at


def app_errors(at) -> list[str]:
    """Error boxes and exceptions of an AppTest run, as text."""
    return [e.value for e in at.error] + [str(e.value) for e in at.exception]


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(sources: tuple[str, str, str], workdir: str | Path, start_timeout: float = 60.0) -> Iterator[str]:
    """``streamlit run app.py`` as ``make run`` starts it, on a free loopback port, serving ``sources`` (a folder
    bundle + world via $BRAIN_DIFFUSER_BUNDLE / $BRAIN_DIFFUSER_NSD_ROOT) with its cache and ``server.log`` under
    ``workdir``. Yields the base URL once /_stcore/health answers; stops the server on exit. Raises RuntimeError
    with the log's tail when it does not start."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    bundle, world, _ = sources
    workdir = Path(workdir)
    port = free_port()
    env = dict(os.environ, BRAIN_DIFFUSER_BUNDLE=bundle, BRAIN_DIFFUSER_NSD_ROOT=world,
               BRAIN_DIFFUSER_CACHE=str(workdir / "bde-cache"))
    root = Path(__file__).resolve().parents[1]
    with open(workdir / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(root / "app.py"),
                                 "--server.headless", "true", "--server.port", str(port), "--server.address",
                                 "127.0.0.1", "--browser.gatherUsageStats", "false",
                                 "--server.fileWatcherType", "none"],
                                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + start_timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        if r.read() == b"ok":
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the streamlit server did not start: "
                                       + (workdir / "server.log").read_text(errors="replace")[-2000:])
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
