"""Dual-guided img2img on tiny random Versatile Diffusion components saved in the real layout."""
import shutil

import numpy as np
import pytest
import torch

from brain_diffuser_core.config import PAPER
from brain_diffuser_core.diffusion import (DualGuidedImg2Img, MaskAwareDualTransformer2D, _make_diffusers_dual,
                                           convert_to_dual_attention, load_versatile_diffusion,
                                           set_dual_guidance)
from brain_diffuser_core.tiny_models import TINY_IMAGE_SIZE, make_tiny_vd, vd_configs

D = vd_configs("tiny")["image_unet"]["cross_attention_dim"]
STEPS = 4  # a short schedule keeps the tests fast; the loop is the same at 50



@pytest.fixture(scope="module")
def vd_folder(tmp_path_factory):
    return make_tiny_vd(tmp_path_factory.mktemp("vd") / "vd")


@pytest.fixture(scope="module")
def pipe(vd_folder):
    return DualGuidedImg2Img(load_versatile_diffusion(vd_folder))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    n = 3
    return dict(
        init_images=rng.integers(0, 256, size=(n, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8),
        text_embeddings=rng.standard_normal((n, 77, D)).astype(np.float32),
        vision_embeddings=rng.standard_normal((n, 257, D)).astype(np.float32),
        uncond_text=rng.standard_normal((77, D)).astype(np.float32),
        uncond_vision=rng.standard_normal((257, D)).astype(np.float32),
    )


def run(pipe, inputs, idx=slice(None), **kw):
    args = {k: (v[idx] if k in ("init_images", "text_embeddings", "vision_embeddings") else v)
            for k, v in inputs.items()}
    kw.setdefault("num_inference_steps", STEPS)
    return pipe(**args, **kw)


def test_components_load_from_subfolders(vd_folder):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    c = load_versatile_diffusion(vd_folder)
    assert isinstance(c.image_unet, UNet2DConditionModel) and isinstance(c.vae, AutoencoderKL)
    assert type(c.text_unet).__name__ == "UNetFlatConditionModel" and isinstance(c.scheduler, DDIMScheduler)
    assert c.dtype == torch.float32 and c.image_unet.dtype == torch.float32  # CPU default


def test_output_shape_and_per_seed_determinism(pipe, inputs):
    a = run(pipe, inputs, seeds=[1, 2, 3])
    assert a.shape == inputs["init_images"].shape and a.dtype == np.uint8
    np.testing.assert_array_equal(run(pipe, inputs, seeds=[1, 2, 3]), a)
    b = run(pipe, inputs, seeds=[4, 2, 3])
    assert not np.array_equal(a[0], b[0])
    assert np.abs(a[1:].astype(int) - b[1:]).max() <= 1  # the other items keep their seeds


def test_batch_position_does_not_change_an_item(pipe, inputs):
    full = run(pipe, inputs, seeds=[10, 11, 12])
    reversed_ = run(pipe, inputs, idx=slice(None, None, -1), seeds=[12, 11, 10])[::-1]
    alone = run(pipe, inputs, idx=slice(2, 3), seeds=[12])
    assert np.abs(full.astype(int) - reversed_).max() <= 1
    assert np.abs(full[2:].astype(int) - alone).max() <= 1


def count_unet_calls(pipe):
    calls = []
    handle = pipe.image_unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("strength,guidance", [(0.75, 7.5), (0.5, 7.5), (1.0, 1.0)])
def test_strength_sets_the_number_of_unet_calls(pipe, inputs, strength, guidance):
    calls, handle = count_unet_calls(pipe)
    try:
        run(pipe, inputs, idx=slice(0, 2), seeds=[1, 2], strength=strength, guidance_scale=guidance)
    finally:
        handle.remove()
    assert len(calls) == int(STEPS * strength)
    assert set(calls) == {4 if guidance > 1 else 2}  # CFG batches [uncond; cond]


def test_callback_steps_and_previews(pipe, inputs):
    seen = []
    run(pipe, inputs, idx=slice(0, 1), seeds=[5], strength=1.0, preview_every=3,
        callback=lambda step, total, latents, preview: seen.append((step, total, tuple(latents.shape),
                                                                    None if preview is None else preview.shape)))
    h = TINY_IMAGE_SIZE // 4
    assert [s[0] for s in seen] == list(range(1, STEPS + 1)) and {s[1] for s in seen} == {STEPS}
    assert {s[2] for s in seen} == {(1, 4, h, h)}
    assert [s[0] for s in seen if s[3] is not None] == [3]
    assert seen[2][3] == (1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)


def test_vision_mix_reaches_the_dual_blocks(pipe, inputs):
    inputs = {k: (v[:2] if k in ("init_images", "text_embeddings", "vision_embeddings") else v)
              for k, v in inputs.items()}
    other_text = dict(inputs, text_embeddings=inputs["text_embeddings"][::-1].copy())
    other_vision = dict(inputs, vision_embeddings=inputs["vision_embeddings"][::-1].copy())
    seeds = [7, 8]

    only_vision = run(pipe, inputs, seeds=seeds, vision_mix=1.0)
    ratios = {m.mix_ratio for m in pipe.image_unet.modules() if isinstance(m, MaskAwareDualTransformer2D)}
    assert ratios == {0.0}  # the weight of the first condition (text)
    np.testing.assert_array_equal(run(pipe, other_text, seeds=seeds, vision_mix=1.0), only_vision)
    assert not np.array_equal(run(pipe, other_vision, seeds=seeds, vision_mix=1.0), only_vision)

    only_text = run(pipe, inputs, seeds=seeds, vision_mix=0.0)
    ratios = {m.mix_ratio for m in pipe.image_unet.modules() if isinstance(m, MaskAwareDualTransformer2D)}
    assert ratios == {1.0}
    np.testing.assert_array_equal(run(pipe, other_vision, seeds=seeds, vision_mix=0.0), only_text)
    assert not np.array_equal(run(pipe, other_text, seeds=seeds, vision_mix=0.0), only_text)
    assert not np.array_equal(only_text, only_vision)


def test_guidance_scale_changes_the_output(pipe, inputs):
    plain = {k: v for k, v in inputs.items() if not k.startswith("uncond")}
    no_cfg = pipe(**plain, seeds=[1, 2, 3], guidance_scale=1.0, num_inference_steps=STEPS)  # no uncond needed
    cfg = run(pipe, inputs, seeds=[1, 2, 3], guidance_scale=PAPER.stage2.guidance_scale)
    assert np.abs(no_cfg.astype(int) - cfg).mean() > 1.0


def fresh_unets(vd_folder):
    c = load_versatile_diffusion(vd_folder)
    return c.image_unet, c.text_unet


def unet_inputs(n=2):
    g = torch.Generator().manual_seed(0)
    h = TINY_IMAGE_SIZE // 4
    return torch.randn(n, 4, h, h, generator=g), torch.tensor(500), torch.randn(n, 77 + 257, D, generator=g)


def test_unpatched_diffusers_dual_transformer_crashes_and_the_fix_runs(vd_folder):
    latents, t, cond = unet_inputs()
    image_unet, text_unet = fresh_unets(vd_folder)
    assert convert_to_dual_attention(image_unet, text_unet, factory=_make_diffusers_dual) > 0
    with pytest.raises(TypeError, match="encoder_attention_mask"):
        image_unet(latents, t, encoder_hidden_states=cond)

    image_unet, text_unet = fresh_unets(vd_folder)
    n_blocks = convert_to_dual_attention(image_unet, text_unet)
    assert n_blocks == 4  # 1 down, 1 mid and 2 up (layers_per_block + 1) cross-attention blocks
    assert convert_to_dual_attention(image_unet, text_unet) == 0  # idempotent
    assert set_dual_guidance(image_unet, vision_mix=0.6) == n_blocks
    with torch.no_grad():
        out = image_unet(latents, t, encoder_hidden_states=cond).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_dual_block_mixes_the_two_transformers(vd_folder):
    image_unet, text_unet = fresh_unets(vd_folder)
    convert_to_dual_attention(image_unet, text_unet)
    block = next(m for m in image_unet.modules() if isinstance(m, MaskAwareDualTransformer2D))
    channels = block.transformers[0].config.in_channels
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, channels, 4, 4, generator=g)
    text, vision = torch.randn(2, 77, D, generator=g), torch.randn(2, 257, D, generator=g)
    with torch.no_grad():
        r_vision = block.transformers[0](h, encoder_hidden_states=vision, return_dict=False)[0] - h  # image UNet's transformer
        r_text = block.transformers[1](h, encoder_hidden_states=text, return_dict=False)[0] - h  # text UNet's transformer
        set_dual_guidance(image_unet, vision_mix=0.6)
        out = block(h, torch.cat([text, vision], dim=1), encoder_attention_mask=None, return_dict=False)[0]
        masked = block(h, torch.cat([text, vision], dim=1), encoder_attention_mask=torch.ones(2, 334),
                       return_dict=False)[0]
    torch.testing.assert_close(out, 0.6 * r_vision + 0.4 * r_text + h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(masked, out, rtol=1e-4, atol=1e-5)  # an all-keep mask changes nothing


def test_bad_inputs_name_argument_rule_and_value(pipe, inputs):
    with pytest.raises(ValueError, match=r"'text_embeddings' must have shape \(3, 77, 32\).*\(3, 76, 32\)"):
        pipe(**dict(inputs, text_embeddings=inputs["text_embeddings"][:, :76]), seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="'seeds' must hold one seed per image \\(3\\); 2 were provided"):
        run(pipe, inputs, seeds=[1, 2])
    with pytest.raises(ValueError, match="'strength' must be in \\(0, 1\\]"):
        run(pipe, inputs, seeds=[1, 2, 3], strength=0.05)
    with pytest.raises(ValueError, match="'vision_mix' must be in \\[0, 1\\]; 1.5"):
        run(pipe, inputs, seeds=[1, 2, 3], vision_mix=1.5)
    with pytest.raises(ValueError, match="'uncond_text' is required when guidance_scale > 1"):
        pipe(**dict(inputs, uncond_text=None), seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="divisible by 4 but are 30 and 32"):
        pipe(**dict(inputs, init_images=inputs["init_images"][:, :30]), seeds=[1, 2, 3])


def test_missing_weights_message(vd_folder, tmp_path):
    broken = tmp_path / "vd"
    shutil.copytree(vd_folder, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing diffusion_pytorch_model.safetensors") as err:
        load_versatile_diffusion(broken)
    assert "vae" in str(err.value) and "hf download shi-labs/versatile-diffusion" in str(err.value)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a model in the Hugging Face cache"):
        load_versatile_diffusion("no-such-org/no-such-vd")


def test_configs_keep_the_real_constraints():
    for size in ("real", "tiny"):
        cfg = vd_configs(size)
        text, vision, unet = cfg["text_encoder"], cfg["image_encoder"], cfg["image_unet"]
        assert text["max_position_embeddings"] == PAPER.stage2.text_tokens
        assert (vision["image_size"] // vision["patch_size"]) ** 2 + 1 == PAPER.stage2.vision_tokens
        assert text["projection_dim"] == vision["projection_dim"] == unet["cross_attention_dim"]
        assert cfg["text_unet"]["block_out_channels"] == unet["block_out_channels"]
        assert [b.replace("Flat", "2D") for b in cfg["text_unet"]["down_block_types"]] == unet["down_block_types"]
    real = vd_configs("real")
    assert real["image_unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert real["image_unet"]["cross_attention_dim"] == PAPER.stage2.clip_dim
    assert real["vae"]["scaling_factor"] == PAPER.stage2.vae_scaling_factor
    with pytest.raises(ValueError, match="'size' must be one of \\[.*'tiny'.*\\]; 'huge'"):
        vd_configs("huge")


def test_default_dtype_is_fp16_on_cuda_and_fp32_elsewhere():
    from brain_diffuser_core.diffusion import _default_dtype

    assert _default_dtype(torch.device("cuda"), None) == torch.float16
    assert _default_dtype(torch.device("cpu"), None) == torch.float32
    assert _default_dtype(torch.device("cuda"), torch.float32) == torch.float32


# ------------------------------------------------------------------------------------------ paper parity
PNDM_CONFIG = {  # what diffusers' conversion script writes for Versatile Diffusion: no clip_sample key
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}


def _with_scheduler_config(vd_folder, tmp_path, config):
    import json

    folder = tmp_path / "vd"
    shutil.copytree(vd_folder, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def test_the_scheduler_is_the_papers_from_a_pndm_config(vd_folder, tmp_path, recwarn):
    c = load_versatile_diffusion(_with_scheduler_config(vd_folder, tmp_path, PNDM_CONFIG))
    cfg = c.scheduler.config
    # DDIMScheduler.from_pretrained on this file would give clip_sample=True, set_alpha_to_one=True
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (False, False, 1)
    assert not [w for w in recwarn if "scheduler_config.json" in str(w.message)]
    # the original's DDIM: alpha-bar of t=0 for the last step, timesteps 981, 961, ..., 1
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert float(c.scheduler.final_alpha_cumprod) == pytest.approx(float(alphas_cumprod[0]), rel=1e-6)
    c.scheduler.set_timesteps(50)
    assert c.scheduler.timesteps.tolist() == list(range(981, 0, -20))


def test_a_scheduler_config_that_disagrees_is_named_in_a_warning(vd_folder, tmp_path):
    bad = dict(PNDM_CONFIG, beta_end=0.02, clip_sample=True)
    with pytest.warns(UserWarning, match=r"beta_end=0.02 \(paper: 0.012\), clip_sample=True \(paper: False\)"):
        c = load_versatile_diffusion(_with_scheduler_config(vd_folder, tmp_path, bad))
    assert c.scheduler.config.beta_end == 0.012 and c.scheduler.config.clip_sample is False


def test_start_noise_offset_noises_to_741_and_denoises_from_721(pipe, inputs, monkeypatch):
    from diffusers import DDIMScheduler

    noised, denoised = [], []
    real_add_noise = DDIMScheduler.add_noise
    monkeypatch.setattr(DDIMScheduler, "add_noise",
                        lambda self, x, n, t: noised.append(t.tolist()) or real_add_noise(self, x, n, t))
    real_forward = pipe.image_unet.forward

    def unet_spy(sample, t, *a, **k):
        denoised.append(int(t))
        raise KeyboardInterrupt  # the first step is all this test needs

    monkeypatch.setattr(pipe.image_unet, "forward", unet_spy)
    for offset, expect in ((0, 721), (1, 741)):
        with pytest.raises(KeyboardInterrupt):
            run(pipe, inputs, idx=slice(0, 2), seeds=[1, 2], num_inference_steps=50, strength=0.75,
                start_noise_offset=offset)
        assert noised[-1] == [expect, expect] and denoised[-1] == 721
    with pytest.raises(KeyboardInterrupt):  # strength 1: nothing before the first timestep, capped there
        run(pipe, inputs, idx=slice(0, 1), seeds=[1], num_inference_steps=50, strength=1.0, start_noise_offset=1)
    assert noised[-1] == [981] and denoised[-1] == 981
    monkeypatch.setattr(pipe.image_unet, "forward", real_forward)
    with pytest.raises(ValueError, match="'start_noise_offset' must be a non-negative integer"):
        run(pipe, inputs, seeds=[1, 2, 3], start_noise_offset=-1)


def test_truncated_output_floors_what_rounding_rounds(pipe):
    latents = torch.randn(2, 4, TINY_IMAGE_SIZE // pipe.vae_scale_factor, TINY_IMAGE_SIZE // pipe.vae_scale_factor,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    x = ((x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255).numpy()
    np.testing.assert_array_equal(pipe.decode_latents(latents, truncate=True), np.floor(x).astype(np.uint8))
    np.testing.assert_array_equal(pipe.decode_latents(latents), np.round(x).astype(np.uint8))
    assert (pipe.decode_latents(latents) != pipe.decode_latents(latents, truncate=True)).any()


def test_a_component_config_that_does_not_match_its_weights_is_an_error(vd_folder, tmp_path):
    import json

    broken = tmp_path / "vd"
    shutil.copytree(vd_folder, broken)
    cfg_path = broken / "image_unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [32, 96]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        load_versatile_diffusion(broken)
    msg = str(err.value)
    assert str(broken / "image_unet" / "diffusion_pytorch_model.safetensors") in msg and str(cfg_path) in msg
    assert "shape mismatches" in msg and "file (" in msg and "vs model (" in msg
    # a config of another model: missing and unexpected keys are listed
    vae_cfg = json.loads((broken / "vae" / "config.json").read_text())
    cfg_path.write_text(json.dumps(dict(vae_cfg, _class_name="UNet2DConditionModel")))
    with pytest.raises(ValueError, match=r"missing keys: \[.*unexpected keys: \["):
        load_versatile_diffusion(broken)
    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a readable JSON config"):
        load_versatile_diffusion(broken)
    cfg_path.unlink()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_versatile_diffusion(broken)
