"""The Streamlit app (app.py + pages/) driven by streamlit.testing.v1.AppTest on a small MiniNSD world and a
tiny random-weight bundle fitted to its voxel counts (the real data and pipeline code paths, tiny models)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from app_sources import APP_STEPS as STEPS, APP_TIMEOUT as TIMEOUT, app_errors, app_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


def _errors(at) -> list[str]:
    return app_errors(at)


# ------------------------------------------------------------------------------------------------ frame
def test_frame_rejects_bad_bundle_folders(app, tmp_path, loopback):
    app.session_state["bundle_folder"] = str(tmp_path / "nope")
    app.run()
    assert not app.exception
    assert any("does not exist" in e.value for e in app.sidebar.error)
    app.sidebar.text_input(key="bundle_folder").set_value(str(tmp_path)).run()
    assert any("manifest.json" in e.value for e in app.sidebar.error), [e.value for e in app.sidebar.error] + [str(x.value) for x in app.exception]
    (tmp_path / "manifest.json").write_text("{not json")
    app.run()
    assert any("not valid JSON" in e.value for e in app.sidebar.error)


def test_frame_sidebar_and_average_only_where_it_applies(app, sources):
    app.run()
    assert not _errors(app), _errors(app)
    subject = app.sidebar.selectbox(key="subject")
    assert subject.options == ["subject 1", "subject 2", "average of all subjects"]
    assert any("Running on **cpu**" in c.value for c in app.sidebar.caption)
    ctx = app.session_state["app_context"]
    assert ctx.bundle_path == str(Path(sources[0]).resolve()) and ctx.num_inference_steps == STEPS
    app.switch_page("pages/browse.py").run()
    assert not _errors(app), _errors(app)
    assert app.sidebar.selectbox(key="subject").options == ["subject 1", "subject 2"]


def test_frame_demo_is_the_default_and_shows_its_note(sources, monkeypatch):
    """The first run of a process builds the demo under a progress bar (a progress callback reaches the
    builder), later runs use the cached sources; the builder's note is shown in the sidebar."""
    from pages import _state

    bundle, world, cache = sources
    calls = []
    monkeypatch.setenv("BRAIN_DIFFUSER_CACHE", str(Path(cache).parent / "bde-cache"))
    monkeypatch.setattr(_state, "build_demo_sources",
                        lambda progress=None: calls.append(progress) or (bundle, world, "demo models are untrained (test)"))
    monkeypatch.setattr(_state, "_DEMO_CHECKED", [])
    _state.demo_sources.clear()
    try:
        for _ in range(2):
            at = AppTest.from_file(APP, default_timeout=TIMEOUT)
            at.session_state["num_inference_steps"] = STEPS
            at.run()
            assert not _errors(at), _errors(at)
            assert at.sidebar.radio(key="bundle_source").value == "demo"
            assert [w.value for w in at.sidebar.warning] == ["demo models are untrained (test)"]
            assert at.session_state["app_context"].nsd_root == world
    finally:
        _state.demo_sources.clear()
    # first run: once with a progress callback (the bar), once through the cached demo_sources; then cached only
    assert len(calls) == 2 and callable(calls[0]) and calls[1] is None


def test_demo_sources_uses_the_world_and_the_demo_bundle(sources, monkeypatch):
    """The body of build_demo_sources with the slow builders replaced by the fixture's world and bundle; a full
    disk during the world build is reported with the cache folder and the way out."""
    import errno

    import brain_diffuser_core.world.build as build
    import brain_diffuser_core.world.demo as demo
    from pages import _state

    bundle, world, _ = sources
    calls = []
    monkeypatch.setattr(build, "ensure_world", lambda progress=None: Path(world))
    monkeypatch.setattr(demo, "ensure_demo_bundle",
                        lambda world_root, progress=None: calls.append(world_root) or Path(bundle))
    got = _state.build_demo_sources()
    assert got == (str(Path(bundle).resolve()), str(Path(world).resolve()), "")  # tiny bundle: no untrained flag
    assert calls == [Path(world).resolve()]

    def full(progress=None):
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/world/x.nii.gz")

    monkeypatch.setattr(build, "ensure_world", full)
    with pytest.raises(demo.DemoDiskFullError, match="BRAIN_DIFFUSER_CACHE"):
        _state.build_demo_sources()


# ------------------------------------------------------------------------------------------------ ROI designer
def test_roi_designer_preset_surface_and_generate(app):
    from brain_diffuser_core.config import PAPER

    app.run()
    assert not _errors(app), _errors(app)
    assert app.title[0].value == "ROI designer"
    app.selectbox(key="roi_preset").set_value("V1-V4+faces").run()
    assert app.slider(key="roi_w_faces").value == 1.0 and app.slider(key="roi_w_V2").value == 1.0
    assert app.slider(key="roi_w_places").value == 0.0
    assert any("V1-V4+faces" in m.value for m in app.markdown)
    # the world has NSD's transform files: one fsaverage5 figure holding both hemispheres
    assert len(app.get("plotly_chart")) == 1
    app.slider(key="roi_n_seeds").set_value(2).run()
    app.button(key="roi_generate").click().run()
    assert not _errors(app), _errors(app)
    recs = next(iter(app.session_state["roi_results"].values()))
    assert len(recs) == 2 and recs[0].seed != recs[1].seed
    assert recs[0].settings["num_inference_steps"] == STEPS
    assert recs[0].settings["strength"] == PAPER.stage2.strength
    captions = [c for img in app.get("image") for c in img.captions]
    assert [c for c in captions if c.startswith("seed ")] == [f"seed {r.seed}" for r in recs]
    assert any("2 scene(s)" in c.value for c in app.caption)


def test_roi_designer_makes_the_paper_roi_figure(app):
    from brain_diffuser_core.roi_grid import GRID_ROIS

    app.run()
    app.slider(key="roi_grid_seeds").set_value(1).run()
    app.button(key="roi_grid_go").click().run()
    assert not _errors(app), _errors(app)
    key, picture = app.session_state["roi_grid"]
    # 13 rows (8 ROIs + 5 bands) of 80 px under an 18 px header; columns: 2 subjects + the average, 1 seed each
    assert picture.shape == (18 + len(GRID_ROIS) * 80, 64 + 3 * (80 + 6), 3)
    assert any("rows: ROIs" in c for img in app.get("image") for c in img.captions)
    assert any(b.label == "Download the ROI figure (PNG)" for b in app.get("download_button"))


def test_roi_designer_average_and_hemisphere(app):
    app.run()
    app.sidebar.selectbox(key="subject").set_value("average").run()
    assert not _errors(app), _errors(app)
    assert any("subjects 1, 2" in m.value for m in app.markdown)
    text = [m.value for m in app.markdown if "voxels active" in m.value][0]
    n_both = int(text.split("**: ")[1].split(" of ")[0])
    app.radio(key="roi_hemisphere").set_value("left").run()
    text = [m.value for m in app.markdown if "voxels active" in m.value][0]
    n_left = int(text.split("**: ")[1].split(" of ")[0])
    assert 0 < n_left < n_both


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_roi_designer_upload_errors_and_valid_vector(app, sources):
    from brain_diffuser_core.nsd import load_subject

    n_vox = load_subject(sources[1], 1, cache_dir=sources[2], progress=False).n_voxels
    app.run()
    cases = [
        (_npy(np.zeros(n_vox + 3, np.float32)), f"shape ({n_vox},)"),
        (_npy(np.full(n_vox, np.nan)), "NaN/inf"),
        (b"hello, this is not numpy", "could not be read"),
        (_npy(np.array(["a"] * n_vox)), "must be numeric"),
    ]
    for data, message in cases:
        app.file_uploader(key="roi_upload_npy").set_value(("v.npy", data, "application/octet-stream")).run()
        assert any(message in e.value for e in app.error), (message, [e.value for e in app.error])
    good = np.zeros(n_vox, np.float32)
    good[:50] = 1.0
    app.file_uploader(key="roi_upload_npy").set_value(("mine.npy", _npy(good), "application/octet-stream")).run()
    assert not _errors(app), _errors(app)
    assert any("50 of" in m.value and "`mine`" in m.value for m in app.markdown)
    # an uploaded vector belongs to one subject: the average refuses it
    app.sidebar.selectbox(key="subject").set_value("average").run()
    assert any("choose a single subject" in e.value for e in app.error)


def test_roi_designer_loads_a_pattern_json(app):
    from pages._views import pattern_to_json

    app.run()
    text = pattern_to_json("mine", {"places": 1.5, "ecc1": 0.5}, "right")
    app.file_uploader(key="roi_load_json").set_value(("p.json", text.encode(), "application/json")).run()
    assert not _errors(app), _errors(app)
    assert app.slider(key="roi_w_places").value == 1.5 and app.slider(key="roi_w_V1").value == 0.0
    assert app.radio(key="roi_hemisphere").value == "right"
    bad = json.dumps({"format": "brain-diffuser-explorer/roi-pattern", "weights": {"V9": 1}})
    app.file_uploader(key="roi_load_json").set_value(("bad.json", bad.encode(), "application/json")).run()
    assert any("V9" in e.value for e in app.error)


# ------------------------------------------------------------------------------------------------ browse
def test_browse_caption_search_reconstruct_and_cache(app, sources):
    from brain_diffuser_core.nsd import load_subject

    subj = load_subject(sources[1], 1, cache_dir=sources[2], progress=False)
    app.run()
    app.switch_page("pages/browse.py").run()
    assert not _errors(app), _errors(app)
    test_ids = [int(i) for i in subj.test_image_ids]
    assert app.number_input(key="browse_index").value == 0
    assert f"73k id {test_ids[0]}" in [c for img in app.get("image") for c in img.captions][0]
    app.radio(key="browse_pick").set_value("73k id").run()
    app.selectbox(key="browse_id").set_value(test_ids[4]).run()
    assert f"73k id {test_ids[4]}" in [c for img in app.get("image") for c in img.captions][0]
    assert [c.value for c in app.caption if c.value.startswith("- ")] == [f"- {c}" for c in subj.captions(test_ids[4])]
    app.radio(key="browse_pick").set_value("caption search").run()
    target = int(subj.test_image_ids[2])
    word = max(subj.captions(target)[0].split(), key=len)
    app.text_input(key="browse_query").set_value(word).run()
    match = app.selectbox(key="browse_match")
    expected = [int(i) for i in subj.test_image_ids if any(word.lower() in c.lower() for c in subj.captions(int(i)))]
    assert [int(o.split(":")[0]) for o in match.options] == expected and target in expected
    match.set_value(target).run()
    app.button(key="browse_run").click().run()
    assert not _errors(app), _errors(app)
    (key, rec), = app.session_state["browse_results"].items()
    assert key[2] == target and rec.final is not None
    assert {d.label for d in app.get("download_button") if "PNG" in d.label} == {"Download stage 1 (PNG)",
                                                                                "Download final (PNG)"}
    # the trial reconstructed alone also counts for the gallery (which shows the first test trials by default)
    assert "Download the gallery (zip, 1 trial)" in [d.label for d in app.get("download_button")]
    assert f"final (seed {rec.seed})" in [c for img in app.get("image") for c in img.captions]
    app.run()
    assert app.button(key="browse_run").disabled  # cached: a rerun does not reconstruct again
    # the cached result is the pipeline's own answer for that trial and seed
    from pages._state import diffuser

    row = list(subj.test_image_ids).index(target)
    again = diffuser(key[0], "auto").reconstruct(subj.test_fmri[row:row + 1], 1, image_ids=[target],
                                                 num_inference_steps=STEPS)[0]
    np.testing.assert_array_equal(again.stage1, rec.stage1)


def _png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def test_browse_gallery_batches_caches_and_zips(app, sources):
    import zipfile

    from brain_diffuser_core.nsd import load_subject

    subj = load_subject(sources[1], 1, cache_dir=sources[2], progress=False)
    test_ids = [int(i) for i in subj.test_image_ids]
    picked = [test_ids[1], test_ids[3], test_ids[5]]
    app.run()
    app.switch_page("pages/browse.py").run()
    assert not _errors(app), _errors(app)
    app.multiselect(key="browse_gallery_ids").set_value(picked).run()
    assert app.button(key="browse_gallery_run").label == "Reconstruct 3 trial(s)"
    assert [b.label for b in app.get("download_button") if "gallery" in b.label] == []  # nothing to zip yet
    app.button(key="browse_gallery_run").click().run()
    assert not _errors(app), _errors(app)
    results = app.session_state["browse_results"]
    assert sorted(k[2] for k in results) == sorted(picked)
    assert all(not r.features for r in results.values())  # images only in the per-session cache
    captions = [c for img in app.get("image") for c in img.captions]
    assert [c.split(":")[0] for c in captions if ": final (seed" in c] == [str(i) for i in picked]
    assert [s.label for s in app.status][-1] == "Reconstructed 3 trial(s)"
    assert "Download the gallery (zip, 3 trials)" in [b.label for b in app.get("download_button")]
    # the zip holds the cached images pixel for pixel, the originals, and a manifest with seeds and settings
    zip_key, data = app.session_state["browse_zip"]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        assert [e["id"] for e in manifest["items"]] == [str(i) for i in picked]
        for key in zip_key:
            rec, i = results[key], key[2]
            np.testing.assert_array_equal(_png_array(zf.read(f"{i}/final.png")), rec.final)
            np.testing.assert_array_equal(_png_array(zf.read(f"{i}/original.png")), subj.image(i))
    assert manifest["items"][0]["settings"]["num_inference_steps"] == STEPS and manifest["subject"] == 1
    # cached per trial: the gallery is done, and the single-trial view of a gallery trial needs no new run
    app.run()
    assert app.button(key="browse_gallery_run").disabled
    app.number_input(key="browse_index").set_value(3).run()
    assert app.button(key="browse_run").disabled
    # a gallery result is the pipeline's own answer for that trial alone
    from pages._state import diffuser

    row = test_ids.index(picked[0])
    alone = diffuser(zip_key[0][0], "auto").reconstruct(subj.test_fmri[row:row + 1], 1, image_ids=[picked[0]],
                                                       num_inference_steps=STEPS)[0]
    np.testing.assert_array_equal(alone.stage1, results[zip_key[0]].stage1)


def test_browse_shows_the_place_in_the_queue(app, monkeypatch):
    """Another user's generation holds the models: the page reports "1 ahead of you", then runs when it ends."""
    import threading
    import time

    from pages import _state

    seen = []
    real = _state.queue_reporter

    def recording(status, running):
        on_wait = real(status, running)
        return lambda position: (seen.append(position), on_wait(position))

    monkeypatch.setattr(_state, "queue_reporter", recording)
    app.run()
    app.switch_page("pages/browse.py").run()
    assert not _errors(app), _errors(app)
    lock = _state.diffuser(app.session_state["app_context"].bundle_path, "auto").models.lock
    lock.acquire()  # the other user's generation

    def other_user_finishes():
        deadline = time.monotonic() + TIMEOUT
        while 1 not in seen and time.monotonic() < deadline:
            time.sleep(0.02)
        lock.release()

    releaser = threading.Thread(target=other_user_finishes, daemon=True)
    releaser.start()
    app.button(key="browse_run").click().run()
    releaser.join(5)
    assert not _errors(app), _errors(app)
    assert seen[0] == 1 and seen[-1] == 0 and set(seen) == {0, 1}  # (a 1 s heartbeat may repeat the 1)
    assert lock.queue_length() == 0 and lock.heartbeat_s == _state.QUEUE_HEARTBEAT_S
    assert _state.wait_label(1, "x") == "Waiting: 1 generation ahead of you"
    assert _state.wait_label(3, "x") == "Waiting: 3 generations ahead of you" and _state.wait_label(0, "x") == "x"
    assert app.status[0].label.startswith("Reconstructed in") and app.status[0].state == "complete"


# ------------------------------------------------------------------------------------------------ evaluation
def test_evaluation_page_computes_once_then_reloads(app, sources, monkeypatch):
    import brain_diffuser_core.evaluation as evaluation
    from brain_diffuser_core.export import load_evaluation, rank_trials

    app.run()
    app.switch_page("pages/evaluation.py").run()
    assert not _errors(app), _errors(app)
    assert app.title[0].value == "Evaluation"
    assert app.number_input(key="eval_n").value == 6  # CPU: min(24, all 6 test images)
    app.number_input(key="eval_n").set_value(4).run()
    assert app.button(key="eval_run").label == "Run evaluation" and not app.get("plotly_chart")
    app.button(key="eval_run").click().run()
    assert not _errors(app), _errors(app)
    assert app.status[0].label == "Evaluated 4 trials x 3 variants"
    table = [m.value for m in app.markdown if "| method |" in m.value][0]
    assert "ours (full) subj 1" in table and "ours (stage2_only) subj 1" in table
    assert "Brain-Diffuser (published)" in table
    charts = app.get("plotly_chart")
    assert len(charts) == 5 + 1  # PixCorr, both SSIMs, CLIP, EffNet-Lite0 bars + the distributions
    assert "SSIM (paper's 1-D columns)" in table
    # the galleries show the best and worst trials by the chosen metric, from the cached per-trial values
    ctx = app.session_state["app_context"]
    from brain_diffuser_core.config import cache_root
    from brain_diffuser_core.export import evaluation_folder

    folders = list((cache_root() / "evaluations").glob("*/subj01/*"))
    assert len(folders) == 1
    res = load_evaluation(folders[0])
    assert res.image_ids.tolist() == _subject_ids(sources)[:4]
    assert set(res.metrics) == {"PixCorr", "SSIM", "SSIM (paper's 1-D columns)", "CLIP", "EffNet-Lite0"}
    app.selectbox(key="eval_rank_metric").set_value("SSIM").run()
    app.slider(key="eval_k").set_value(2).run()
    captions = [c for img in app.get("image") for c in img.captions if "SSIM =" in c]
    values = res.per_trial["full"]["SSIM"]
    best, worst = rank_trials(values, 2), rank_trials(values, 2, best=False)
    assert captions == [f"{res.image_ids[i]}: SSIM = {values[i]:.3f}" for i in best + worst]
    assert folders[0] == evaluation_folder(cache_root(), ctx.bundle_path, 1, _eval_settings(app, 4))
    # a second visit (a new session) reloads the folder: nothing is recomputed
    real_evaluate = evaluation.evaluate_bundle
    monkeypatch.setattr(evaluation, "evaluate_bundle", lambda *a, **k: pytest.fail("recomputed"))
    again = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key in ("bundle_source", "bundle_folder", "nsd_root_folder", "num_inference_steps"):
        again.session_state[key] = app.session_state[key]
    again.run()
    again.switch_page("pages/evaluation.py").run()
    again.number_input(key="eval_n").set_value(4).run()
    assert not _errors(again), _errors(again)
    assert not [b for b in again.button if b.key == "eval_run"]
    assert any("Loaded from the cache" in c.value for c in again.caption)
    assert len(again.get("plotly_chart")) == 6
    # paper mode is its own evaluation: a new folder, the published SSIM as "SSIM", true 2-D SSIM beside it
    monkeypatch.setattr(evaluation, "evaluate_bundle", real_evaluate)  # (undo() would drop the allowed roots too)
    app.toggle(key="eval_paper").set_value(True).run()
    assert app.selectbox(key="eval_rescale").disabled
    app.button(key="eval_run").click().run()
    assert not _errors(app), _errors(app)
    table = [m.value for m in app.markdown if "| method |" in m.value][0]
    assert "ours (full, paper mode) subj 1" in table and "SSIM (2-D)" in table
    paper_folder = evaluation_folder(cache_root(), ctx.bundle_path, 1, dict(_eval_settings(app, 4), rescale="paper",
                                                                            paper=True))
    paper_res = load_evaluation(paper_folder)
    assert paper_res.info["mode"] == "paper" and paper_res.info["rescale"] == "paper"
    assert set(paper_res.metrics) == {"PixCorr", "SSIM", "SSIM (2-D)", "CLIP", "EffNet-Lite0"}


def _subject_ids(sources) -> list[int]:
    from brain_diffuser_core.nsd import load_subject

    return [int(i) for i in load_subject(sources[1], 1, cache_dir=sources[2], progress=False).test_image_ids]


def _eval_settings(app, n: int) -> dict:
    ctx = app.session_state["app_context"]
    return {"rows": list(range(n)), "variants": ["full", "stage1", "stage2_only"],
            "networks": ["clip", "efficientnet_lite0"], "rescale": "train", "paper": False, "base_seed": ctx.seed,
            "num_inference_steps": ctx.num_inference_steps, "format": 2}


# ------------------------------------------------------------------------------------------------ walkthrough
def test_walkthrough_runs_every_step_with_slider_settings(app):
    app.run()
    app.switch_page("pages/walkthrough.py").run()
    assert not _errors(app), _errors(app)
    assert app.slider(key="walk_strength").value == pytest.approx(0.75)
    app.slider(key="walk_guidance").set_value(3.0).run()
    app.button(key="walk_run").click().run()
    assert not _errors(app), _errors(app)
    headers = [h.value for h in app.header]
    assert headers == ["1. The fMRI pattern", "2. Predicted VDVAE latents -> stage 1", "3. Predicted CLIP features",
                       "4. Diffusion steps", "5. Final reconstruction"]
    (rec, previews), = app.session_state["walk_results"].values()
    assert rec.settings["guidance_scale"] == 3.0 and rec.settings["denoising_steps"] == int(STEPS * 0.75)
    assert len(previews) >= 1


# ------------------------------------------------------------------------------------------------ helpers
def test_parse_pattern_npy_rules():
    from pages._views import parse_pattern_npy

    np.testing.assert_array_equal(parse_pattern_npy(_npy(np.arange(5)[None]), 5), np.arange(5, dtype=np.float32))
    with pytest.raises(ValueError, match="at most"):
        parse_pattern_npy(_npy(np.zeros(1000)), 1000, max_bytes=100)
    with pytest.raises(ValueError, match=r"shape \(5,\); shape \(2, 5\)"):
        parse_pattern_npy(_npy(np.zeros((2, 5))), 5)
    with pytest.raises(ValueError, match="1 NaN/inf values \\(first at index 3\\)"):
        parse_pattern_npy(_npy(np.array([0, 1, 2, np.inf, 4.0])), 5)
    with pytest.raises(ValueError, match="could not be read"):
        parse_pattern_npy(_npy(np.array([{"a": 1}], dtype=object)), 1)  # needs pickle: refused


def test_pattern_json_roundtrip():
    from pages._views import pattern_from_json, pattern_to_json

    spec = pattern_from_json(pattern_to_json("x", {"V1": 1, "faces": -0.5}, "left"), ["V1", "faces"])
    assert spec == {"name": "x", "weights": {"V1": 1.0, "faces": -0.5}, "hemisphere": "left"}
    with pytest.raises(ValueError, match="finite number"):
        pattern_from_json(json.dumps({"format": "brain-diffuser-explorer/roi-pattern", "weights": {"V1": "a"}}), ["V1"])


# ------------------------------------------------------------------------------------------------ real server
async def _session(port: int, page_name: str) -> dict:
    """One browser-less session over the server's websocket: rerun at ``page_name``, collect until finished."""
    import asyncio

    import websockets
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    async with websockets.connect(f"ws://127.0.0.1:{port}/_stcore/stream", max_size=2**28) as ws:
        msg = BackMsg()
        msg.rerun_script.page_name = page_name
        await ws.send(msg.SerializeToString())
        out = {"texts": [], "exceptions": []}
        while True:
            fm = ForwardMsg()
            fm.ParseFromString(await asyncio.wait_for(ws.recv(), timeout=TIMEOUT))
            kind = fm.WhichOneof("type")
            if kind == "delta" and fm.delta.WhichOneof("type") == "new_element":
                el = fm.delta.new_element
                which = el.WhichOneof("type")
                if which == "exception":
                    out["exceptions"].append(el.exception.message)
                elif which in ("heading", "alert"):
                    out["texts"].append(getattr(el, which).body)
            if kind == "script_finished":
                out["status"] = fm.script_finished
                return out


def test_real_server_serves_every_page(sources, tmp_path):
    """`streamlit run app.py` as `make run` starts it; each page's first run in a fresh session has no error
    (this also covers Streamlit's legacy pages/-folder mode, which applies to a process's first run)."""
    import asyncio

    with app_server(sources, tmp_path) as url:
        port = int(url.rsplit(":", 1)[1])
        # the evaluation page first: its file is pages/evaluation.py, so the legacy mode of a process's first
        # run would run that file without the frame if its url path were "evaluation"
        for page_name, title in (("evaluate", "Evaluation"), ("", "ROI designer"), ("trials", "Browse test trials"),
                                 ("step-by-step", "Walkthrough")):
            got = asyncio.run(_session(port, page_name))
            assert got["exceptions"] == [], (page_name, got["exceptions"])
            assert got["texts"][:2] == ["Brain-Diffuser Explorer", title], (page_name, got["texts"])


def test_default_cpu_threads_env_and_half_the_cores(monkeypatch):
    import os

    from pages import _state

    monkeypatch.delenv(_state.THREADS_ENV, raising=False)
    assert _state.default_cpu_threads() == max(1, (os.cpu_count() or 2) // 2)
    monkeypatch.setenv(_state.THREADS_ENV, "3")
    assert _state.default_cpu_threads() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv(_state.THREADS_ENV, bad)
        with pytest.raises(ValueError, match="BRAIN_DIFFUSER_THREADS"):
            _state.default_cpu_threads()


# ------------------------------------------------------------------------------------------------ shared server
def test_frame_shared_server_refuses_folders_outside_the_roots(app, sources, tmp_path, monkeypatch):
    """Served beyond loopback (AppTest has no server.address), a folder outside $BRAIN_DIFFUSER_ROOTS is refused
    with one message whether it exists or not; the same user then opens an allowed bundle and the app works."""
    import os
    import shutil

    bundle, world, _ = sources
    monkeypatch.setenv("BRAIN_DIFFUSER_ROOTS", str(Path(bundle).resolve().parent))  # the sources only
    secret = tmp_path / "secret"
    shutil.copytree(bundle, secret)  # a real bundle, outside the roots
    link = Path(bundle).resolve().parent / f"link-{tmp_path.name}"
    os.symlink(secret, link)
    try:
        seen = {}
        for name, text in (("existing", str(secret)), ("missing", str(tmp_path / "nope")), ("symlink", str(link))):
            app.session_state["bundle_folder"] = text
            app.run()
            assert not app.exception
            errors = [e.value for e in app.sidebar.error]
            assert len(errors) == 1 and "presenter allowed" in errors[0], errors
            seen[name] = errors[0].replace(repr(text), "<entered>")
        assert len(set(seen.values())) == 1, seen  # missing and forbidden look the same
        assert "does not exist" not in seen["missing"]
        print("refused:", seen["existing"])
        app.session_state["bundle_folder"] = str(Path(bundle).parent / "x" / ".." / Path(bundle).name)
        app.run()
        assert any("must not contain '..'" in e.value for e in app.sidebar.error)
        app.session_state["bundle_folder"] = bundle
        app.run()
        assert not _errors(app), _errors(app)
        assert app.title[0].value == "ROI designer"
        assert any("only folders the presenter allowed" in c.value for c in app.sidebar.caption)
    finally:
        link.unlink()


def test_uploads_over_the_limit_or_too_many_are_refused_other_sessions_unaffected(app, sources, monkeypatch):
    from app_sources import make_app_test
    from brain_diffuser_core.nsd import load_subject

    monkeypatch.setenv("BRAIN_DIFFUSER_UPLOAD_MB", "1")
    monkeypatch.setenv("BRAIN_DIFFUSER_UPLOADS_PER_MINUTE", "3")
    n_vox = load_subject(sources[1], 1, cache_dir=sources[2], progress=False).n_voxels
    good = np.zeros(n_vox, np.float32)
    good[:50] = 1.0
    app.run()
    upload = app.file_uploader(key="roi_upload_npy")
    big = _npy(np.zeros(300_000, np.float32))  # 1.1 MiB
    upload.set_value(("big.npy", big, "application/octet-stream")).run()
    assert any("big.npy: uploads on this server must be at most 1.0 MiB; this file is 1.1 MiB" in e.value
               for e in app.error), _errors(app)
    for name in ("a.npy", "b.npy"):
        app.file_uploader(key="roi_upload_npy").set_value((name, _npy(good), "application/octet-stream")).run()
        assert not _errors(app), _errors(app)
    app.file_uploader(key="roi_upload_npy").set_value(("c.npy", _npy(good), "application/octet-stream")).run()
    flood = [e.value for e in app.error]
    assert any("c.npy: too many uploads from this browser" in e and "at most 3 per 60 s" in e for e in flood), flood
    assert not any("`c`" in m.value for m in app.markdown)  # the refused upload is not used
    other = make_app_test(sources, monkeypatch)  # another student's session: its own allowance
    other.run()
    other.file_uploader(key="roi_upload_npy").set_value(("mine.npy", _npy(good), "application/octet-stream")).run()
    assert not _errors(other), _errors(other)
    assert any("50 of" in m.value and "`mine`" in m.value for m in other.markdown)


def test_session_result_caches_are_bounded_in_bytes(app, monkeypatch):
    """A session's reconstructions stay within $BRAIN_DIFFUSER_SESSION_CACHE_MB; the oldest are evicted."""
    from brain_diffuser_core.limits import ByteLRU, nbytes_of

    monkeypatch.setenv("BRAIN_DIFFUSER_SESSION_CACHE_MB", "0.03")  # 31 KB: the tiny models' results are 11 KB
    app.run()
    app.switch_page("pages/browse.py").run()
    app.button(key="browse_gallery_run").click().run()
    assert not _errors(app), _errors(app)
    results = app.session_state["browse_results"]
    assert isinstance(results, ByteLRU) and results.max_bytes == int(0.03 * 2**20)
    sizes = [nbytes_of(r) for r in results.values()]
    assert results.nbytes == sum(sizes) <= results.max_bytes
    assert len(results) == results.max_bytes // max(sizes) < 6 and results.evictions == 6 - len(results)
    kept = [k[2] for k in results.keys()]
    shown = [int(c.split(":")[0]) for img in app.get("image") for c in img.captions if "final" in c]
    gallery = [int(i) for i in app.multiselect(key="browse_gallery_ids").value]
    assert kept == shown == gallery[-len(kept):], (kept, shown, gallery)  # the newest kept, and shown


# ------------------------------------------------------------------------------------------------ presenter
def test_students_follow_the_presenter_and_reuse_its_results(sources, monkeypatch):
    """The presenter (token in the sidebar) runs a walkthrough trial; a student who follows lands on the same
    page, trial and sliders and sees the presenter's result without running a generation; a student with a wrong
    token presents nothing."""
    from app_sources import make_app_test
    from pages import _state

    monkeypatch.setenv("BRAIN_DIFFUSER_PRESENTER_TOKEN", "tok-123456")
    _state.presenter_stage.clear()
    try:
        teacher = make_app_test(sources, monkeypatch)
        teacher.session_state["presenter_token"] = "tok-123456"
        teacher.run()
        assert teacher.session_state["app_context"].presenter
        teacher.switch_page("pages/walkthrough.py").run()
        teacher.number_input(key="walk_index").set_value(3).run()
        teacher.slider(key="walk_strength").set_value(0.5).run()
        teacher.button(key="walk_run").click().run()
        assert not _errors(teacher), _errors(teacher)
        (rec, _), = teacher.session_state["walk_results"].values()

        student = make_app_test(sources, monkeypatch)
        student.run()  # starts on the ROI designer, on its own
        assert not student.session_state["app_context"].presenter
        student.toggle(key="follow_presenter").set_value(True).run()  # the sidebar's "Lab meeting" toggle
        assert not _errors(student), _errors(student)
        assert student.title[0].value == "Walkthrough"  # the presenter's page
        assert student.number_input(key="walk_index").value == 3 and student.slider(key="walk_strength").value == 0.5
        assert any("Shown from the presenter's run" in c.value for c in student.caption)
        assert len(student.session_state["walk_results"]) == 0  # nothing ran for the student
        captions = [c for img in student.get("image") for c in img.captions]
        assert f"final (seed {rec.seed})" in captions
        # the presenter moves on: the follower's next run takes the new trial (the page polls for it)
        teacher.number_input(key="walk_index").set_value(1).run()
        student.run()
        assert student.number_input(key="walk_index").value == 1
        assert not any("Shown from the presenter's run" in c.value for c in student.caption)

        intruder = make_app_test(sources, monkeypatch)
        intruder.session_state["presenter_token"] = "guess"
        intruder.run()
        intruder.switch_page("pages/walkthrough.py").run()
        intruder.number_input(key="walk_index").set_value(5).run()
        assert not intruder.session_state["app_context"].presenter
        assert _state.presenter_stage().scene("Walkthrough").values["walk_index"] == 1  # unchanged
    finally:
        _state.presenter_stage.clear()
