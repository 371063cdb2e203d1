import numpy as np
import pytest

from brain_diffuser_core.world.scenes import (
    CATEGORIES,
    CATEGORY_KEYWORDS,
    FIELD_DEG,
    category_labels,
    generate_scene,
    generate_scenes,
    scene_seed,
    stack_images,
)


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(120, seed=7)


def _skin_pixels(img):
    r, g, b = (img[..., k].astype(int) for k in range(3))
    return (r > 95) & (g > 40) & (r > g + 10) & (g > b) & (r - b > 40) & (r - g < 90)


def _hf_energy(img):
    grey = img.astype(np.float32).mean(-1) / 255.0
    lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float((lap ** 2).mean())


def test_scene_is_deterministic_per_seed():
    a, b = generate_scene(123), generate_scene(123)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    np.testing.assert_array_equal(a.image, b.image)
    assert a.captions == b.captions and a.objects == b.objects and a.category == b.category
    c = generate_scene(124)
    assert not np.array_equal(a.image, c.image)


def test_generate_scenes_items_regenerate_alone():
    many = generate_scenes(14, seed=3)
    k = 9
    alone = generate_scene(scene_seed(k, seed=3), CATEGORIES[k % len(CATEGORIES)])
    np.testing.assert_array_equal(many[k].image, alone.image)
    assert many[k].captions == alone.captions


def test_category_balance_and_labels(scenes):
    labels = category_labels(scenes)
    assert labels.shape == (120,)
    counts = np.bincount(labels, minlength=len(CATEGORIES))
    assert counts.tolist() == [20] * len(CATEGORIES)
    assert [CATEGORIES[i] for i in labels] == [s.category for s in scenes]
    assert stack_images(scenes).shape == (120, 64, 64, 3)


def test_five_captions_each_mentioning_the_category(scenes):
    for s in scenes:
        assert len(s.captions) == 5 and len(set(s.captions)) == 5
        for cap in s.captions:
            words = cap.lower().replace(",", " ").replace(".", " ").replace(":", " ").split()
            assert any(k in words for k in CATEGORY_KEYWORDS[s.category]), (s.category, cap)


def test_scene_graph_geometry(scenes):
    for s in scenes:
        main = s.objects[0]
        assert main.category == s.category
        for o in s.objects:
            assert 0 <= o.x <= 1 and 0 <= o.y <= 1 and o.size > 0
            assert o.eccentricity == pytest.approx(np.hypot(o.x - 0.5, o.y - 0.5) * FIELD_DEG, abs=1e-6)
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    signs = [s for s in scenes if s.category == "word"]
    assert all(s.objects[0].text.isalpha() and s.objects[0].text.isupper() for s in signs)


def test_face_scenes_contain_skin_tones(scenes):
    faces = [s for s in scenes if s.category == "face"]
    textures = [s for s in scenes if s.category == "texture"]
    face_skin = [int(_skin_pixels(s.image).sum()) for s in faces]
    assert min(face_skin) >= 20
    tex_skin = [int(_skin_pixels(s.image).sum()) for s in textures]
    assert np.median(face_skin) > 5 * np.median(tex_skin) + 50


def test_textures_have_more_high_frequency_energy_than_places(scenes):
    tex = [_hf_energy(s.image) for s in scenes if s.category == "texture"]
    places = [_hf_energy(s.image) for s in scenes if s.category == "place"]
    assert np.median(tex) > 3 * np.median(places)
    assert min(tex) > np.median(places)


def test_word_scenes_show_letters_dark_on_light_or_light_on_dark(scenes):
    # letters make a sign's box bimodal: both very dark and very bright pixels inside it
    for s in [s for s in scenes if s.category == "word"][:10]:
        x0, y0, x1, y1 = (int(round(v * 64)) for v in s.objects[0].bbox)
        grey = s.image[y0:y1, x0:x1].astype(float).mean(-1)
        assert grey.max() - grey.min() > 120


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'category' must be one of"):
        generate_scene(1, category="cat")
    with pytest.raises(ValueError, match="'n' must be a non-negative"):
        generate_scenes(-1)
    with pytest.raises(ValueError, match="'categories' must be"):
        generate_scenes(3, categories=("face", "dog"))
