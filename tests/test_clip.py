"""CLIP features with Versatile Diffusion's normalisation, on tiny random CLIPs in the real folder layouts."""
import shutil

import numpy as np
import pytest
import torch

from brain_diffuser_core.config import PAPER
from brain_diffuser_core.features.clip import ClipFeatureExtractor
from brain_diffuser_core.tiny_models import make_tiny_clip, make_tiny_vd, vd_configs

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return {"plain": make_tiny_clip(root / "clip"), "vd": make_tiny_vd(root / "vd")}


@pytest.fixture(scope="module")
def clip(folders):
    return ClipFeatureExtractor.from_pretrained(folders["vd"])


def test_shapes_and_dtypes(clip, rng):
    d = vd_configs("tiny")["text_encoder"]["projection_dim"]
    assert clip.dim == d and clip.text_tokens == PAPER.stage2.text_tokens
    assert clip.vision_tokens == PAPER.stage2.vision_tokens
    text = clip.text_embeddings(["a red bus", "a bus on a road"])
    assert text.shape == (77, d) and text.dtype == np.float32
    batch = clip.text_embeddings_batch([["a cat"], ["a dog", "two dogs"], [""]])
    assert batch.shape == (3, 77, d) and batch.dtype == np.float32
    images = rng.integers(0, 256, size=(3, 40, 50, 3), dtype=np.uint8)
    vision = clip.vision_embeddings(images, batch_size=2)
    assert vision.shape == (3, 257, d) and vision.dtype == np.float32


def test_plain_and_vd_layouts_load_the_same_towers(folders, clip, rng):
    plain = ClipFeatureExtractor.from_pretrained(folders["plain"])
    images = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(plain.text_embeddings(["a boat"]), clip.text_embeddings(["a boat"]), atol=1e-6)
    np.testing.assert_allclose(plain.vision_embeddings(images), clip.vision_embeddings(images), atol=1e-6)


def test_text_normalisation_matches_independent_computation(clip):
    caption = "a small dog"
    ids = clip.tokenizer([caption], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = clip.text_encoder.text_model(ids).last_hidden_state[0].numpy()  # (77, hidden)
    w = clip.text_encoder.text_projection.weight.detach().numpy()  # (D, hidden)
    eos = clip.text_encoder.config.eos_token_id
    eos_pos = int(np.flatnonzero(ids[0].numpy() == eos)[0])  # the pooled token: first end-of-text
    tokens = hidden @ w.T
    expected = tokens / np.linalg.norm(tokens[eos_pos])
    np.testing.assert_allclose(clip.text_embeddings([caption]), expected, rtol=1e-4, atol=1e-5)


def test_vision_normalisation_matches_independent_computation(clip, rng):
    image = rng.integers(0, 256, size=(1, 32, 32, 3), dtype=np.uint8)  # already the tiny CLIP's 32 px
    pixels = ((image[0] / 255.0 - OPENAI_MEAN) / OPENAI_STD).astype(np.float32).transpose(2, 0, 1)[None]
    vm = clip.image_encoder.vision_model
    with torch.no_grad():
        hidden = vm(torch.from_numpy(pixels)).last_hidden_state[0].numpy()  # (257, hidden), before post-LN
    ln_w, ln_b = vm.post_layernorm.weight.detach().numpy(), vm.post_layernorm.bias.detach().numpy()
    mu, var = hidden.mean(-1, keepdims=True), hidden.var(-1, keepdims=True)
    normed = (hidden - mu) / np.sqrt(var + vm.post_layernorm.eps) * ln_w + ln_b
    tokens = normed @ clip.image_encoder.visual_projection.weight.detach().numpy().T
    expected = tokens / np.linalg.norm(tokens[0])
    got = clip.vision_embeddings(image)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert abs(np.linalg.norm(got[0]) - 1.0) < 1e-5


def test_captions_are_averaged_and_batches_match_single_calls(clip):
    a, b = clip.text_embeddings(["a cat"]), clip.text_embeddings(["a tall tree"])
    assert not np.allclose(a, b)
    np.testing.assert_allclose(clip.text_embeddings(["a cat", "a tall tree"]), (a + b) / 2, atol=1e-6)
    batch = clip.text_embeddings_batch([["a tall tree"], ["a cat", "a tall tree"], ["a cat"]], batch_size=3)
    np.testing.assert_allclose(batch[0], b, atol=1e-6)
    np.testing.assert_allclose(batch[1], (a + b) / 2, atol=1e-6)
    np.testing.assert_allclose(batch[2], a, atol=1e-6)


def test_unconditional_embeddings(clip):
    np.testing.assert_allclose(clip.unconditional_text(), clip.text_embeddings([""]), atol=1e-6)
    grey = np.full((1, 60, 60, 3), PAPER.stage2.unconditional_grey, dtype=np.uint8)
    np.testing.assert_allclose(clip.unconditional_vision(), clip.vision_embeddings(grey)[0], atol=1e-5)
    assert not np.allclose(clip.unconditional_text(), clip.text_embeddings(["a cat"]))


def test_bad_inputs_name_the_argument(clip):
    with pytest.raises(ValueError, match="'images' must be a uint8 array"):
        clip.vision_embeddings(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"'caption_lists\[1\]' must hold at least one caption"):
        clip.text_embeddings_batch([["a"], []])
    with pytest.raises(TypeError, match="'caption_lists' must be a list of caption lists"):
        clip.text_embeddings_batch(["a cat", "a dog"])


def test_missing_file_message_names_file_layout_and_source(folders, tmp_path):
    broken = tmp_path / "clip"
    shutil.copytree(folders["plain"], broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing preprocessor_config.json") as err:
        ClipFeatureExtractor.from_pretrained(broken)
    assert "openai/clip-vit-large-patch14" in str(err.value) and "hf download" in str(err.value)

    broken_vd = tmp_path / "vd"
    shutil.copytree(folders["vd"], broken_vd)
    (broken_vd / "image_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors") as err:
        ClipFeatureExtractor.from_pretrained(broken_vd)
    assert "image_encoder" in str(err.value) and "Versatile Diffusion layout" in str(err.value)


def test_absent_model_id_is_never_downloaded():
    with pytest.raises(FileNotFoundError, match="neither a folder nor a model in the Hugging Face cache"):
        ClipFeatureExtractor.from_pretrained("no-such-org/no-such-clip")


def _bilinear_truncated(image, size):
    """Bilinear resize written out (half-pixel centres, edges clamped), then truncated to uint8."""
    h, w = image.shape[:2]

    def weights(n_in):
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    (r0, r1, fr), (c0, c1, fc) = weights(h), weights(w)
    x = image.astype(np.float64)
    rows = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
    out = rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]
    return np.floor(out + 1e-9).astype(np.uint8)


def test_paper_preprocessing_is_512_bilinear_truncated_first(clip, rng):
    from PIL import Image

    from brain_diffuser_core.features.clip import paper_resize

    image = rng.integers(0, 256, size=(1, 85, 85, 3), dtype=np.uint8)
    ours = paper_resize(image)[0]
    want = _bilinear_truncated(image[0], 512)
    assert ours.shape == (512, 512, 3) and np.abs(ours.astype(int) - want.astype(int)).max() <= 1
    assert (ours == want).mean() > 0.99  # float32 vs float64 at exact .0 boundaries only
    rounded = np.asarray(Image.fromarray(image[0]).resize((512, 512), Image.BILINEAR))
    assert (ours != rounded).mean() > 0.2  # truncation, not PIL's rounding
    np.testing.assert_allclose(clip.vision_embeddings(image, preprocess="paper"),
                               clip.vision_embeddings(ours[None]), atol=1e-6)
    assert not np.allclose(clip.vision_embeddings(image, preprocess="paper"), clip.vision_embeddings(image), atol=1e-4)
    with pytest.raises(ValueError, match="'preprocess' must be one of"):
        clip.vision_embeddings(image, preprocess="bicubic")


def test_the_papers_unconditional_grey_is_127(clip):
    from brain_diffuser_core.config import PAPER_MODE

    assert PAPER_MODE.unconditional_grey == 127
    grey = np.full((1, 60, 60, 3), 127, dtype=np.uint8)
    np.testing.assert_allclose(clip.unconditional_vision(grey=127), clip.vision_embeddings(grey)[0], atol=1e-5)
    assert not np.allclose(clip.unconditional_vision(grey=127), clip.unconditional_vision(), atol=1e-5)
