import numpy as np
import pytest

from brain_diffuser_core.world.judge import CategoryJudge, degrade, judge_scenes
from brain_diffuser_core.world.scenes import CATEGORIES, scene_seed
from brain_diffuser_core.world.train import generator_scenes_data


def test_judge_scenes_are_balanced_fresh_and_split():
    fit, fit_labels = judge_scenes(2, "fit")
    held, held_labels = judge_scenes(2, "heldout")
    assert fit.shape == (12, 64, 64, 3) and fit.dtype == np.uint8
    assert list(fit_labels) == list(held_labels) == [i % 6 for i in range(12)]
    assert not any(np.array_equal(a, b) for a in fit for b in held)
    # never a world image (the world draws scene_seed(i)) nor a generator scene
    world_seeds = {scene_seed(i) for i in range(1000)}
    from brain_diffuser_core.seeding import seed_for

    assert not world_seeds & {seed_for("judge-scene", "fit", i) for i in range(12)}
    gen, _ = generator_scenes_data(6)
    assert not any(np.array_equal(a, b) for a in fit[:6] for b in gen)


def test_judge_learns_the_categories_and_caches_without_pickle(tmp_path):
    judge = CategoryJudge.cached(tmp_path, n_per_category=6, n_heldout_per_category=4)
    # 24 held-out fresh scenes, chance is 1/6: ImageNet features separate the world's categories well
    # fitted on each of the 36 fresh scenes crisp and degraded
    assert judge.heldout_accuracy >= 0.6 and judge.n_fit == 72 and judge.n_heldout == 24
    assert 0.0 <= judge.degraded_accuracy <= 1.0
    files = list((tmp_path / "judge").glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as z:
        assert z["weight"].shape == (6, 1280)
    again = CategoryJudge.cached(tmp_path, n_per_category=6, n_heldout_per_category=4)
    images, labels = judge_scenes(1, "heldout")
    np.testing.assert_allclose(again.probabilities(images), judge.probabilities(images), rtol=1e-5, atol=1e-6)
    assert again.degraded_accuracy == judge.degraded_accuracy
    assert again.describe() == judge.describe() and "correct on 24 other fresh scenes" in judge.describe()
    assert f"{judge.degraded_accuracy:.1%} on them degraded" in judge.describe()
    assert set(judge.classify(images)) <= set(CATEGORIES)


def test_degrade_is_seeded_per_image_and_softens_the_scenes(monkeypatch):
    import brain_diffuser_core.world.judge as judge_module

    images, _ = judge_scenes(2, "heldout")
    out = degrade(images, "heldout")
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(degrade(images, "heldout"), out)
    # image i's degradation depends on its index and split only, not on how many images follow it
    np.testing.assert_array_equal(degrade(images[:5], "heldout"), out[:5])
    assert not np.array_equal(degrade(images, "fit"), out)
    # every image changed, the layout kept (a fine grating may blur away: the median, not each one)
    assert all(np.abs(o.astype(np.int16) - i).mean() > 1.0 for o, i in zip(out, images))
    r = [np.corrcoef(o.ravel().astype(np.float32), i.ravel().astype(np.float32))[0, 1] for o, i in zip(out, images)]
    assert np.median(r) > 0.6
    # the blur is really applied: with the shrink and the noise off, the fine detail (pixel differences) falls
    monkeypatch.setattr(judge_module, "DEGRADE_BLUR_PX", (2.0, 2.0))
    monkeypatch.setattr(judge_module, "DEGRADE_SIDE_PX", (64, 64))
    monkeypatch.setattr(judge_module, "DEGRADE_NOISE_SD", (0.0, 0.0))
    blurred = degrade(images, "heldout")

    def detail(a):
        return float(np.abs(np.diff(a.astype(np.float32), axis=2)).mean())
    assert detail(blurred) < 0.7 * detail(images)
