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
