import numpy as np
import pytest
import torch

from brain_diffuser_core.bundle import BundleError
from brain_diffuser_core.config import PAPER
from brain_diffuser_core.pipeline import BrainDiffuser, upscale_bicubic
from brain_diffuser_core.seeding import seed_for
from brain_diffuser_core.tiny_bundle import make_tiny_bundle
from brain_diffuser_core.tiny_models import TINY_IMAGE_SIZE

FAST = dict(num_inference_steps=4)  # strength 0.75 -> 3 denoising steps: enough to test the plumbing


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    path = make_tiny_bundle(root / "bundle", subjects=(1, 2))
    return BrainDiffuser(path, device="cpu")


def test_trial_reconstruction_shapes_and_timings(tiny, rng):
    n_vox = tiny.bundle.subject_info(1)["n_voxels"]
    fmri = rng.standard_normal((2, n_vox)).astype(np.float32)
    recs = tiny.reconstruct(fmri, 1, image_ids=[10, 20], **FAST)
    assert len(recs) == 2
    r = recs[0]
    s = tiny.models.vdvae.config.image_size
    assert r.stage1.shape == (s, s, 3) and r.stage1.dtype == np.uint8
    assert r.stage1_upscaled.shape == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert r.final.shape == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3) and r.final.dtype == np.uint8
    assert r.features["clip_text"].shape == tiny.bundle.feature_shape("clip_text")
    assert r.seed == seed_for("trial", 10)
    assert set(r.timings) == {"features", "stage1", "stage2", "total"}
    assert r.settings["denoising_steps"] == int(4 * PAPER.stage2.strength)


def test_a_trial_reproduces_alone_whatever_the_batch(tiny, rng):
    n_vox = tiny.bundle.subject_info(1)["n_voxels"]
    fmri = rng.standard_normal((3, n_vox)).astype(np.float32)
    batch = tiny.reconstruct(fmri, 1, image_ids=[5, 6, 7], **FAST)
    alone = tiny.reconstruct(fmri[2:], 1, image_ids=[7], **FAST)[0]
    np.testing.assert_array_equal(batch[2].stage1, alone.stage1)
    np.testing.assert_allclose(batch[2].final.astype(int), alone.final.astype(int), atol=1)
    other_seed = tiny.reconstruct(fmri[2:], 1, image_ids=[7], base_seed=1, **FAST)[0]
    assert not np.array_equal(other_seed.stage1, alone.stage1)


def test_settings_reach_stage2(tiny, rng):
    n_vox = tiny.bundle.subject_info(1)["n_voxels"]
    fmri = rng.standard_normal((1, n_vox)).astype(np.float32)
    steps = []
    tiny.reconstruct(fmri, 1, callback=lambda stage, i, total, _p: steps.append((stage, total)),
                     num_inference_steps=10, strength=0.5)
    assert ("stage1", 1) in steps
    assert [t for s, t in steps if s == "stage2"] == [5] * 5
    a = tiny.reconstruct(fmri, 1, guidance_scale=1.0, **FAST)[0].final
    b = tiny.reconstruct(fmri, 1, guidance_scale=7.5, **FAST)[0].final
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="unknown setting"):
        tiny.reconstruct(fmri, 1, strenght=0.5)


def test_stage1_only(tiny, rng):
    n_vox = tiny.bundle.subject_info(2)["n_voxels"]
    recs = tiny.reconstruct(rng.standard_normal((1, n_vox)), 2, run_stage2=False)
    assert recs[0].final is None and recs[0].timings["stage2"] < 0.5


def _intercept(decoder):
    """The prediction for an all-zero pattern, from the dense weights."""
    t = {k: v.double().numpy() for k, v in decoder.tensors.items()}
    return t["y_mean"] - t["x_mean"] @ decoder.dense_weight().double().numpy()


def _expected_roi_features(decoder, pattern, norm=None):
    """Independent computation of the authors' ROI-optimal rule: intercept + norm * (W p) / ||W p||."""
    w = decoder.dense_weight().double().numpy()                       # (n_voxels, n_targets)
    t = {k: v.double().numpy() for k, v in decoder.tensors.items()}
    intercept = _intercept(decoder)
    drive = np.asarray(pattern, np.float64) @ w
    if norm is None:
        norm = np.sqrt((t["y_std"] ** 2).sum())                       # RMS deviation of train features
    return intercept + norm * drive / np.linalg.norm(drive)


def test_pattern_features_train_scale_sets_only_the_pattern_driven_part(tiny):
    patterns = {s: np.zeros(tiny.bundle.subject_info(s)["n_voxels"], np.float32) for s in (1, 2)}
    for s in patterns:
        patterns[s][:10] = 1.0
    per_subject = {}
    for s in (1, 2):
        got = tiny.pattern_features({s: patterns[s]}, scale="train")
        for name, feat in got.items():
            want = _expected_roi_features(tiny.bundle.decoder(s, name), patterns[s])
            np.testing.assert_allclose(feat.reshape(-1), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
        per_subject[s] = got
    both = tiny.pattern_features(patterns, scale="train")              # the subject average
    for name in both:
        np.testing.assert_allclose(both[name], (per_subject[1][name] + per_subject[2][name]) / 2,
                                   rtol=1e-5, atol=1e-6)
        # the intercept is not rescaled: features sit at the train mean plus a typical-train-sized deviation
        dec = tiny.bundle.decoder(1, name)
        dev = np.linalg.norm(per_subject[1][name].reshape(-1) - _intercept(dec))
        assert dev == pytest.approx(float(np.sqrt((dec.tensors["y_std"].numpy() ** 2).sum())), rel=1e-3)
    recs = tiny.reconstruct_pattern(patterns, name="V1", n_seeds=2, **FAST)
    assert len(recs) == 2 and recs[0].seed != recs[1].seed
    assert recs[0].seed == seed_for("pattern", "V1", 0)


def test_pattern_features_default_quantile_scale_against_the_training_targets(tiny, tmp_path):
    """The default ROI-optimal rule: intercept + u * z * sd, with u the pattern-driven direction and sd the
    training targets' standard deviation along it, computed here from the targets themselves (each subject and
    the subject average); the decoders were fitted through the real fit path, which keeps principal axes."""
    from statistics import NormalDist

    from brain_diffuser_core.bundle import SubjectDecoders, save_bundle
    from brain_diffuser_core.cli.fit import fit_decoders
    from brain_diffuser_core.config import FEATURE_NAMES, ROI_PATTERN_QUANTILE

    rng = np.random.default_rng(5)
    shapes = {name: tiny.bundle.feature_shape(name) for name in FEATURE_NAMES}
    entries, targets = {}, {}
    for s in (1, 2):
        n_vox = tiny.bundle.subject_info(s)["n_voxels"]
        x = rng.standard_normal((60, n_vox)).astype(np.float32)
        feats = {}
        for name, shape in shapes.items():
            mix = rng.standard_normal((8, int(np.prod(shape))))  # correlated features: 8 latent factors + noise
            y = (x[:, :8] + 0.3 * rng.standard_normal((60, 8))) @ mix + 0.1 * rng.standard_normal((60, mix.shape[1]))
            targets[(s, name)] = y.astype(np.float32)
            feats[name] = targets[(s, name)].reshape((60,) + shape)
        decoders, norms, _ = fit_decoders(x, feats, alphas={name: 10.0 for name in shapes})
        assert all(d.has_target_axes for d in decoders.values())
        entries[s] = SubjectDecoders(n_voxels=n_vox, mask_sha256=f"q{s}", decoders=decoders, train_feature_norm=norms)
    bd = BrainDiffuser(save_bundle(tmp_path / "b", entries, feature_shapes=shapes, models=tiny.bundle.models),
                       models=tiny.models)
    z = NormalDist().inv_cdf(ROI_PATTERN_QUANTILE)
    patterns = {s: np.zeros(bd.bundle.subject_info(s)["n_voxels"], np.float32) for s in (1, 2)}
    for s in patterns:
        patterns[s][3:15] = 1.0
    per_subject = {}
    for s in (1, 2):
        got = bd.pattern_features({s: patterns[s]})
        for name in shapes:
            dec = bd.bundle.decoder(s, name)
            drive = patterns[s].astype(np.float64) @ dec.dense_weight().double().numpy()
            u = drive / np.linalg.norm(drive)
            y = targets[(s, name)].astype(np.float64)
            sd = float(((y - y.mean(0)) @ u).std())
            want = _intercept(dec) + z * sd * u
            np.testing.assert_allclose(got[name].reshape(-1), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
        per_subject[s] = got
    both = bd.pattern_features(patterns)
    for name in both:
        np.testing.assert_allclose(both[name], (per_subject[1][name] + per_subject[2][name]) / 2, rtol=1e-5,
                                   atol=1e-6)
    # a decoder fitted before bundle format 3 (no axes) falls back to the RMS-norm rule, saying so
    old = tiny.bundle.decoder(1, "clip_text")
    saved = {k: old.tensors.pop(k) for k in ("target_axes", "target_axes_var", "target_residual_var")}
    try:
        from brain_diffuser_core.pipeline import pattern_driven_features

        p = patterns[1][None, :old.n_features]
        np.testing.assert_allclose(pattern_driven_features(old, p), pattern_driven_features(old, p, scale="train"))
    finally:
        old.tensors.update(saved)


def test_pattern_features_paper_scale_uses_the_original_constants(tiny):
    n_vox = tiny.bundle.subject_info(1)["n_voxels"]
    two = np.zeros((2, n_vox), np.float32)
    two[0, :10], two[1, 10:30] = 1.0, 1.0
    got = tiny.pattern_features({1: two}, scale="paper")
    for name, norm in (("clip_text", 9.0), ("clip_vision", 15.0)):
        for i in range(2):
            want = _expected_roi_features(tiny.bundle.decoder(1, name), two[i], norm=norm)
            np.testing.assert_allclose(got[name][i].reshape(-1), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    np.testing.assert_allclose(np.linalg.norm(got["vdvae"].reshape(2, -1), axis=1), 80.0, rtol=1e-5)
    with pytest.raises(ValueError, match="needs >= 2"):
        tiny.pattern_features({1: two[:1]}, scale="paper")
    with pytest.raises(ValueError, match="'scale' must be one of"):
        tiny.pattern_features({1: two}, scale="norm")


def test_bad_patterns_are_named(tiny):
    n_vox = tiny.bundle.subject_info(1)["n_voxels"]
    with pytest.raises(ValueError, match=f"{n_vox} values per row"):
        tiny.reconstruct_pattern({1: np.ones(n_vox + 3)})
    bad = np.ones(n_vox)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        tiny.reconstruct_pattern({1: bad})
    with pytest.raises(BundleError, match="'subject' must be one of"):
        tiny.reconstruct_pattern({5: np.ones(n_vox)})


def test_upscale_bicubic():
    img = np.zeros((1, 8, 8, 3), np.uint8)
    img[0, :4] = 255
    up = upscale_bicubic(img, 32)
    assert up.shape == (1, 32, 32, 3)
    assert up[0, 0, 0, 0] == 255 and up[0, -1, 0, 0] == 0


def test_out_of_memory_is_a_clear_error_and_the_models_keep_serving(tiny, rng, monkeypatch):
    from brain_diffuser_core.pipeline import GenerationError

    n_vox = tiny.bundle.subject_info(1)["n_voxels"]
    fmri = rng.standard_normal((1, n_vox)).astype(np.float32)
    real = tiny.models.img2img

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tiny.models, "img2img", out_of_memory)
    with pytest.raises(GenerationError, match="out of memory.*fewer items.*still loaded"):
        tiny.reconstruct(fmri, 1, **FAST)
    assert not tiny.models.lock.locked()
    monkeypatch.setattr(tiny.models, "img2img", real)
    assert tiny.reconstruct(fmri, 1, **FAST)[0].final is not None


# ------------------------------------------------------------------------------------------------ the queue
def _start(name, target):
    import threading

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    return t


def _wait_for(event, what):
    assert event.wait(20), f"timed out waiting for {what}"


def test_generations_queue_first_come_first_served_and_report_their_place(tiny, rng, monkeypatch):
    """Four users: A generates (held inside a fake slow img2img), B, C, D queue; each hears its place going down
    to 0, they run in arrival order, and C's failure does not block D."""
    import threading

    n_vox = tiny.bundle.subject_info(1)["n_voxels"]
    fmri = rng.standard_normal((1, n_vox)).astype(np.float32)
    real = tiny.models.img2img
    order, positions, errors = [], {}, {}
    a_inside, gate = threading.Event(), threading.Event()
    heard = {name: threading.Event() for name in "BCD"}

    def slow_img2img(*args, **kwargs):
        name = threading.current_thread().name
        order.append(name)
        if name == "A":
            a_inside.set()
            _wait_for(gate, "the gate")
        if name == "C":
            raise RuntimeError("C's generation failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny.models, "img2img", slow_img2img)

    def user(name):
        def on_wait(position):
            positions.setdefault(name, []).append(position)
            if name in heard and position > 0:
                heard[name].set()

        def run():
            try:
                tiny.reconstruct(fmri, 1, on_wait=on_wait, **FAST)
            except Exception as err:  # noqa: BLE001 - recorded and checked below
                errors[name] = err
        return run

    threads = [_start("A", user("A"))]
    _wait_for(a_inside, "A to start generating")
    for name in "BCD":  # each one queues only once the previous one holds its ticket
        threads.append(_start(name, user(name)))
        _wait_for(heard[name], f"{name} to queue")
    assert tiny.models.lock.queue_length() == 4 and tiny.models.lock.locked()
    gate.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert order == ["A", "B", "C", "D"]
    assert positions["A"] == [0]
    for k, name in enumerate("BCD", start=1):  # places seen: from the arrival place down to 0 (a fast generation
        seen = positions[name]                 # ahead may finish before a waiter wakes, skipping a number)
        assert seen[0] == k and seen[-1] == 0 and all(x > y for x, y in zip(seen, seen[1:])), (name, seen)
    assert set(errors) == {"C"} and "C's generation failed" in str(errors["C"])
    assert tiny.models.lock.queue_length() == 0 and not tiny.models.lock.locked()


def _until(check, what):
    import time

    deadline = time.monotonic() + 20
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_caller_that_leaves_the_queue_gives_up_its_place():
    """An on_wait that raises (a user who navigated away) withdraws that ticket: the ones behind move up."""
    import threading

    from brain_diffuser_core.pipeline import GenerationQueue

    q = GenerationQueue()
    q.acquire()  # the running generation
    positions = {"B": [], "C": [], "D": []}
    queued = {k: threading.Event() for k in positions}
    ran = []

    def user(name, leave=False):
        def on_wait(position):
            positions[name].append(position)
            queued[name].set()
            if leave:  # leave once D has queued behind
                _wait_for(queued["D"], "D to queue")
                raise KeyboardInterrupt(f"{name} left")

        def run():
            try:
                with q.report_to(on_wait):  # the thread's default callback, as evaluate_bundle's lock use needs
                    q.acquire()
            except KeyboardInterrupt:
                return
            ran.append(name)
            if name == "B":  # B holds the models until D has seen its place move up to 1
                _until(lambda: positions["D"][-1] == 1, "D to reach position 1")
            q.release()
        return run

    threads = []
    for name, leave in (("B", False), ("C", True), ("D", False)):
        threads.append(_start(name, user(name, leave)))
        _wait_for(queued[name], f"{name} to queue")
    threads[1].join(10)
    assert not threads[1].is_alive() and positions["C"] == [2]  # C heard its place, then left
    _until(lambda: positions["D"][-1] == 2, "D to move up when C left")
    assert positions["D"] == [3, 2] and q.queue_length() == 3  # running + B + D
    q.release()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert ran == ["B", "D"] and positions["B"] == [1, 0] and positions["D"] == [3, 2, 1, 0]
    assert q.queue_length() == 0
    with pytest.raises(RuntimeError, match="no generation holds the queue"):
        q.release()


def test_the_heartbeat_repeats_the_place_and_lets_a_waiter_leave():
    """With heartbeat_s, a waiter hears its unchanged place again and again; a callback that raises on a beat
    (Streamlit stopping the script of a user who left) withdraws the ticket."""
    import threading

    from brain_diffuser_core.pipeline import GenerationQueue

    with pytest.raises(ValueError, match="'heartbeat_s' must be a positive"):
        GenerationQueue(heartbeat_s=0)
    q = GenerationQueue(heartbeat_s=0.02)
    q.acquire()
    beats, left = [], threading.Event()

    def leaving(position):
        beats.append(position)
        if len(beats) == 4:
            raise KeyboardInterrupt("left")

    def run():
        try:
            q.acquire(leaving)
        except KeyboardInterrupt:
            left.set()

    t = _start("B", run)
    _wait_for(left, "B to leave on a heartbeat")
    t.join(5)
    assert beats == [1, 1, 1, 1] and q.queue_length() == 1  # only the running generation is left
    q.release()
    assert q.queue_length() == 0
    q.acquire(lambda p: beats.append(("alone", p)))  # no wait: told 0 at once, no beats
    assert beats[-1] == ("alone", 0)
    q.release()


# ------------------------------------------------------------------------------------------ paper mode
def test_paper_mode_reaches_the_models(tiny, rng, monkeypatch):
    paper = BrainDiffuser(tiny.bundle, tiny.models, paper=True)
    n_vox = tiny.bundle.subject_info(1)["n_voxels"]
    fmri = rng.standard_normal((4, n_vox)).astype(np.float32)
    # test-set z-scoring is the default rescaling in paper mode; the improved default stays "train"
    x = np.asarray(fmri, np.float32)
    dec = tiny.bundle.decoder(1, "clip_text")
    np.testing.assert_allclose(paper.predict_features(fmri, 1)["clip_text"].reshape(4, -1),
                               dec.predict(x, rescale="paper"), rtol=1e-6)
    np.testing.assert_allclose(tiny.predict_features(fmri, 1)["clip_text"].reshape(4, -1),
                               dec.predict(x, rescale="train"), rtol=1e-6)
    calls = []
    real = tiny.models.img2img
    monkeypatch.setattr(tiny.models, "img2img", lambda *a, **k: calls.append(k) or real(*a, **k))
    rec = paper.reconstruct(fmri, 1, **FAST)[0]
    assert (calls[-1]["start_noise_offset"], calls[-1]["truncate_output"]) == (1, True)
    assert rec.settings["rescale"] == "paper" and rec.settings["unconditional_grey"] == 127
    grey127, grey128 = tiny.models.uncond_vision_for(127), tiny.models.uncond_vision_for(128)
    assert calls[-1]["uncond_vision"] is grey127 and not np.allclose(grey127, grey128)
    tiny.reconstruct(fmri[:1], 1, **FAST)
    assert (calls[-1]["start_noise_offset"], calls[-1]["truncate_output"]) == (0, False)
    assert calls[-1]["uncond_vision"] is grey128
    with pytest.raises(ValueError, match="no unconditional vision embedding for grey 3"):
        tiny.models.uncond_vision_for(3)
    # stage 1 samples every pixel in paper mode and takes the mixture mean by default
    assert rec.settings["stage1_output"] == "sample" and tiny.reconstruct(fmri[:1], 1, **FAST)[0].settings[
        "stage1_output"] == "mean"
    # ROI-optimal features use the original's hand-set norms in paper mode
    two = np.zeros((2, n_vox), np.float32)
    two[0, :10], two[1, 10:20] = 1.0, 1.0
    spy = []
    real_pf = paper.pattern_features
    monkeypatch.setattr(paper, "pattern_features", lambda p, **k: spy.append(k) or real_pf(p, **k))
    with pytest.raises(ValueError, match="needs >= 2"):  # one pattern: the original z-scores VDVAE across ROIs
        paper.reconstruct_pattern({1: two[0]}, **FAST)
    assert spy[-1] == {"scale": "paper"}


def test_a_unet_without_sample_size_gives_the_papers_512(tiny):
    from types import SimpleNamespace

    from brain_diffuser_core.pipeline import GenerativeModels

    unet = SimpleNamespace(config=SimpleNamespace(sample_size=None))  # as diffusers' conversion script can leave it
    img2img = SimpleNamespace(image_unet=unet, vae_scale_factor=8, device=torch.device("cpu"), dtype=torch.float32)
    models = GenerativeModels(tiny.models.vdvae, img2img, tiny.models.uncond_text, tiny.models.uncond_vision)
    assert models.image_size == 512 == PAPER.stage2.image_size
    unet.config.sample_size = 64
    assert GenerativeModels(tiny.models.vdvae, img2img, tiny.models.uncond_text, {128: None}).image_size == 512
    unet.config.sample_size = 32
    assert GenerativeModels(tiny.models.vdvae, img2img, tiny.models.uncond_text, {128: None}).image_size == 256


def test_the_queue_logs_tickets_withdrawals_and_the_queue_length(caplog):
    """The server log tells what happened to a user who left while queued (tests/test_browser.py reads it)."""
    import logging

    from brain_diffuser_core.pipeline import GenerationQueue

    caplog.set_level(logging.INFO, logger="brain_diffuser_core.pipeline")
    q = GenerationQueue()
    q.acquire()

    def leave(position):
        raise KeyboardInterrupt(f"left at place {position}")

    with pytest.raises(KeyboardInterrupt):
        q.acquire(leave)
    q.release()
    assert [r.getMessage().removeprefix("generation queue: ") for r in caplog.records] == [
        "ticket 0 drawn, queue length 1", "ticket 0 runs", "ticket 1 drawn, queue length 2",
        "ticket 1 withdrawn while waiting (KeyboardInterrupt), queue length 1", "ticket 0 done, queue length 0"]
