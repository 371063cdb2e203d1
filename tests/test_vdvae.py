"""Tests for the project's own VDVAE (brain_diffuser_core.features.vdvae). Tiny models only (CPU, < 1 s each)."""
import json
import math
import re

import numpy as np
import pytest
import torch

from brain_diffuser_core.config import PAPER
from brain_diffuser_core.features.vdvae import (
    CHECKPOINT_URL,
    VDVAE,
    DmolNet,
    VDVAEConfig,
    expected_state_dict_shapes,
    load_vdvae,
    parse_layer_string,
    save_vdvae,
)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = VDVAE(VDVAEConfig.tiny())
    # the original zero-initialises the prior's last conv; perturb every weight so that all paths matter
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def images(rng):
    return rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ config
def _count_blocks(s):
    n = 0
    for part in s.split(","):
        m = re.fullmatch(r"(\d+)x(\d+)", part)
        n += int(m.group(2)) if m else 1
    return n


def test_imagenet64_config_matches_paper_and_hps():
    cfg = VDVAEConfig.imagenet64()
    assert (cfg.width, cfg.zdim, cfg.bottleneck_multiple, cfg.num_mixtures) == (512, 16, 0.25, 10)
    assert (cfg.no_bias_above, cfg.custom_width_str, cfg.image_size) == (64, "", 64)
    assert cfg.n_latent_layers == 75 == _count_blocks(cfg.dec_blocks)
    assert cfg.feature_dim(31) == PAPER.stage1.feature_dim == 91168
    assert cfg.feature_dim() == 91168
    shapes = cfg.latent_shapes(31)
    by_res = {}
    for c, h, w in shapes:
        assert c == 16 and h == w
        by_res[h] = by_res.get(h, 0) + 1
    assert by_res == {1: 2, 4: 4, 8: 8, 16: 16, 32: 1}
    # the Brain-Diffuser reconstruction script's per-layer sizes
    expected = [2**4] * 2 + [2**8] * 4 + [2**10] * 8 + [2**12] * 16 + [2**14]
    assert [c * h * w for c, h, w in shapes] == expected


def test_parse_layer_string_and_validation():
    assert parse_layer_string("1x2,4m1,64d2,8") == [(1, None), (1, None), (4, 1), (64, 2), (8, None)]
    with pytest.raises(ValueError, match="'RxN'"):
        parse_layer_string("1x2,4q1")
    with pytest.raises(ValueError, match="never produces"):
        VDVAEConfig(image_size=32, enc_blocks="32x1,32d2,16x1", dec_blocks="1x1,32m1", n_feature_layers=1)
    with pytest.raises(ValueError, match="n_feature_layers"):
        VDVAEConfig(n_feature_layers=76)
    with pytest.raises(ValueError, match=r"'n_layers' must be in \[1, 75\]"):
        VDVAEConfig.imagenet64().feature_dim(0)


# --------------------------------------------------------------------------------- full model, on meta
def test_imagenet64_state_dict_layout_on_meta():
    shapes = expected_state_dict_shapes(VDVAEConfig.imagenet64())
    n_params = sum(math.prod(s) for s in shapes.values())
    # openai/vdvae README: "125M parameter model"; exact count of this construction
    assert round(n_params / 1e6) == 125
    assert n_params == 125_005_860
    n_enc = _count_blocks("64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5")
    assert n_enc == 65
    assert f"encoder.enc_blocks.{n_enc - 1}.c4.weight" in shapes
    assert f"encoder.enc_blocks.{n_enc}.c1.weight" not in shapes
    assert "decoder.dec_blocks.74.resnet.c4.bias" in shapes and "decoder.dec_blocks.75.enc.c1.weight" not in shapes
    assert shapes["encoder.in_conv.weight"] == (512, 3, 3, 3)
    assert shapes["encoder.enc_blocks.0.c2.weight"] == (128, 128, 3, 3)
    assert shapes["encoder.enc_blocks.64.c2.weight"] == (128, 128, 1, 1)  # 1x1 blocks use 1x1 convs
    assert shapes["decoder.dec_blocks.0.enc.c1.weight"] == (128, 1024, 1, 1)
    assert shapes["decoder.dec_blocks.0.prior.c4.weight"] == (16 * 2 + 512, 128, 1, 1)
    assert shapes["decoder.dec_blocks.2.prior.c2.weight"] == (128, 128, 3, 3)  # 4m1: 3x3
    assert shapes["decoder.dec_blocks.10.z_proj.weight"] == (512, 16, 1, 1)
    assert shapes["decoder.out_net.out_conv.weight"] == (100, 512, 1, 1)
    assert shapes["decoder.gain"] == shapes["decoder.bias"] == (1, 512, 1, 1)
    bias_xs = sorted(k for k in shapes if k.startswith("decoder.bias_xs."))
    assert [shapes[k][2] for k in sorted(bias_xs, key=lambda k: int(k.rsplit(".", 1)[1]))] == [1, 4, 8, 16, 32, 64]


def test_other_published_models_have_their_readme_sizes():
    # openai/vdvae README: ImageNet-32 "119M", CIFAR-10 "39M" (hps.py block strings)
    i32 = VDVAEConfig(image_size=32, enc_blocks="32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6",
                      dec_blocks="1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40")
    c10 = VDVAEConfig(image_size=32, width=384, enc_blocks="32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
                      dec_blocks="1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21")
    for cfg, millions in [(i32, 119), (c10, 39)]:
        n = sum(math.prod(s) for s in expected_state_dict_shapes(cfg).values())
        assert round(n / 1e6) == millions


# ------------------------------------------------------------------------------------------- training
def test_forward_backward_gives_finite_losses(tiny, images):
    model = tiny.train()
    out = model(torch.from_numpy(images), generator=torch.Generator().manual_seed(0))
    for k in ("elbo", "distortion", "rate"):
        assert out[k].ndim == 0 and torch.isfinite(out[k])
    assert out["rate_per_layer"].shape == (model.config.n_latent_layers,)
    assert torch.all(out["rate_per_layer"] >= 0)
    assert torch.allclose(out["elbo"], out["distortion"] + out["rate"], rtol=1e-5)
    assert torch.allclose(out["rate"], out["rate_per_layer"].sum(), rtol=1e-5)
    # a 256-level uniform guess costs log(256) = 5.55 nats a sub-pixel; an untrained model is in that range
    assert 1.0 < out["distortion"].item() < 20.0
    out["elbo"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder.in_conv.weight.grad.abs().sum() > 0


def test_a_few_adam_steps_lower_the_elbo(rng):
    torch.manual_seed(1)
    model = VDVAE(VDVAEConfig.tiny())
    x = torch.from_numpy(np.repeat(rng.integers(60, 200, size=(2, 1, 1, 3), dtype=np.uint8), 32, 1).repeat(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(12):
        opt.zero_grad()
        loss = model(x, generator=gen)["elbo"]
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first - 0.2


def test_dmol_nll_matches_an_independent_logistic_computation():
    cfg = VDVAEConfig(image_size=32, width=8, zdim=2, num_mixtures=1, enc_blocks="32x1,32d32,1x1",
                      dec_blocks="1x1,32m1", n_feature_layers=1)
    head = DmolNet(cfg)
    mean, log_scale = 0.1, -2.0
    with torch.no_grad():
        head.out_conv.weight.zero_()
        bias = torch.zeros(10)
        # layout: [logit, then per channel (mean, log_scale, coeff)]; coefficients 0 -> channels independent
        for c in range(3):
            bias[1 + 3 * c] = mean
            bias[2 + 3 * c] = log_scale
        head.out_conv.bias.copy_(bias)
    px_z = torch.zeros(1, 8, 2, 2)
    pix = np.array([[[0, 128, 255], [10, 100, 200]], [[64, 65, 66], [250, 3, 128]]], dtype=np.float64)
    target = torch.tensor(pix / 127.5 - 1.0, dtype=torch.float32)[None]

    def sig(v):
        return 1.0 / (1.0 + np.exp(-v))

    x = pix / 127.5 - 1.0
    s = math.exp(log_scale)
    upper = np.where(pix == 255, 1.0, sig((x - mean + 1 / 255) / s))
    lower = np.where(pix == 0, 0.0, sig((x - mean - 1 / 255) / s))
    expected = -np.log(upper - lower).sum() / pix.size
    got = head.nll(px_z, target).item()
    assert got == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------------- encoding
def test_encode_shapes_modes_and_seeds(tiny, images):
    cfg = tiny.config
    assert tiny.latent_shapes(5) == [(4, 1, 1), (4, 4, 4), (4, 4, 4), (4, 8, 8), (4, 8, 8)]
    assert tiny.feature_dim() == 4 + 2 * 64 + 2 * 256 == cfg.feature_dim(cfg.n_feature_layers)
    f = tiny.encode(images, seed=[1, 2, 3])
    assert f.shape == (3, 644) and f.dtype == torch.float32 and torch.isfinite(f).all()
    # the 64 px demo model: every layer up to a quarter of the side, as the paper's 31 layers of ImageNet-64
    cfg64 = VDVAEConfig.tiny(64)
    assert [h for _, h, _ in cfg64.latent_shapes(cfg64.n_feature_layers)] == [1, 4, 4, 8, 8, 16, 16]
    assert cfg64.feature_dim() == 2692
    assert tiny.encode(images, n_layers=2, mode="mean").shape == (3, 68)
    m1, m2 = tiny.encode(images, mode="mean"), tiny.encode(images, mode="mean")
    assert torch.equal(m1, m2)
    assert not torch.allclose(m1, f)
    assert torch.equal(f, tiny.encode(images, seed=[1, 2, 3]))
    assert not torch.allclose(f, tiny.encode(images, seed=[4, 5, 6]))
    g1 = tiny.encode(images, generator=torch.Generator().manual_seed(7))
    assert torch.equal(g1, tiny.encode(images, generator=torch.Generator().manual_seed(7)))
    # per-item seeds: item 2 alone gives its batch result
    alone = tiny.encode(images[2:3], seed=[3])
    assert torch.allclose(alone[0], f[2], atol=1e-5)
    # the first layers do not depend on later ones: 2-layer features are a prefix of the 5-layer ones
    assert torch.allclose(tiny.encode(images, n_layers=2, mode="mean"), m1[:, :68], atol=1e-6)


def test_encode_resizes_and_checks_inputs(tiny, rng):
    big = rng.integers(0, 256, size=(2, 48, 40, 3), dtype=np.uint8)
    f = tiny.encode(torch.from_numpy(big), mode="mean")
    assert f.shape == (2, 644) and torch.isfinite(f).all()
    # a constant image stays constant through the antialiased resize
    flat = np.full((1, 50, 50, 3), 77, dtype=np.uint8)
    assert torch.equal(tiny.prepare_images(flat), torch.full((1, 3, 32, 32), 77.0))
    with pytest.raises(ValueError, match=r"\(n, H, W, 3\)"):
        tiny.encode(big[0])
    with pytest.raises(ValueError, match="uint8"):
        tiny.encode(big.astype(np.float32))
    with pytest.raises(ValueError, match="'mode' must be one of"):
        tiny.encode(big, mode="median")


# ------------------------------------------------------------------------------------------- decoding
def test_decode_shapes_and_per_item_seeds(tiny, images):
    feats = tiny.encode(images, mode="mean")
    out = tiny.decode(feats, seed=[10, 11, 12])
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out, tiny.decode(feats, seed=[10, 11, 12]))
    assert not np.array_equal(out, tiny.decode(feats, seed=[20, 21, 22]))
    # item 1 reproduces alone and at another batch position
    assert np.array_equal(tiny.decode(feats[1:2], seed=[11])[0], out[1])
    swapped = tiny.decode(feats[[1, 0]], seed=[11, 10])
    assert np.array_equal(swapped[0], out[1]) and np.array_equal(swapped[1], out[0])
    # an int seed is reproducible too
    assert np.array_equal(tiny.decode(feats, seed=5), tiny.decode(feats, seed=5))


def test_decode_fixes_given_layers_and_samples_the_rest(tiny, images):
    feats = tiny.encode(images, mode="mean")
    # temperature 0 and the mixture mode: fully deterministic, whatever the seed
    a = tiny.decode(feats, temperature=0.0, seed=[1, 2, 3], output="mean")
    b = tiny.decode(feats, temperature=0.0, seed=[7, 8, 9], output="mean")
    assert np.array_equal(a, b)
    # ... and the image depends on the given latents
    c = tiny.decode(feats[[1, 2, 0]], temperature=0.0, output="mean")
    assert not np.array_equal(a, c)
    # fewer given layers (here 2) are accepted, the length tells how many
    assert tiny.decode(feats[:, :68], seed=[1, 2, 3]).shape == (3, 32, 32, 3)
    # no given layers: unconditional samples
    assert tiny.decode(np.zeros((2, 0), np.float32), seed=[1, 2]).shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="not the size of any number of leading latent layers"):
        tiny.decode(feats[:, :70])
    with pytest.raises(ValueError, match="one seed per item"):
        tiny.decode(feats, seed=[1, 2])


# ----------------------------------------------------------------------------------------- checkpoints
def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_safetensors_round_trip(tiny, images, tmp_path):
    path = save_vdvae(tiny, tmp_path / "tiny.safetensors")
    side = json.loads((tmp_path / "tiny.json").read_text())
    assert side["width"] == 32 and side["dec_blocks"] == tiny.config.dec_blocks
    loaded = load_vdvae(path)  # config from the file itself
    assert loaded.config == tiny.config
    _assert_same_weights(tiny, loaded)
    # weights are bit-identical (above); outputs may differ by float32 rounding (memory alignment of the
    # loaded tensors picks other SIMD paths), so compare to rounding level
    torch.testing.assert_close(loaded.encode(images, mode="mean"), tiny.encode(images, mode="mean"), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="'.safetensors'"):
        save_vdvae(tiny, tmp_path / "tiny.pt")


@pytest.mark.parametrize("prefix", ["", "module."])
def test_th_checkpoint_round_trip(tiny, tmp_path, prefix):
    path = tmp_path / "tiny-model-ema.th"
    torch.save({prefix + k: v for k, v in tiny.state_dict().items()}, path)
    loaded = load_vdvae(path, config=VDVAEConfig.tiny())
    _assert_same_weights(tiny, loaded)
    assert not loaded.training


def test_load_dtype(tiny, tmp_path):
    path = save_vdvae(tiny, tmp_path / "t.safetensors")
    half = load_vdvae(path, dtype=torch.float16)
    assert half.decoder.gain.dtype == torch.float16


def test_mismatched_keys_message(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd.pop("decoder.gain")
    sd["decoder.extra.weight"] = torch.zeros(2)
    sd["decoder.out_net.out_conv.bias"] = torch.zeros(7)
    path = tmp_path / "bad.th"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_vdvae(path, config=VDVAEConfig.tiny())
    msg = str(err.value)
    assert "1 missing keys: ['decoder.gain']" in msg
    assert "1 unexpected keys: ['decoder.extra.weight']" in msg
    assert "decoder.out_net.out_conv.bias: file (7,) vs model (50,)" in msg
    assert "width=32" in msg and str(path) in msg  # the file, the first mismatched keys, the config expected
    # loading tiny weights as the paper's model lists (at most 10 of) the many differences
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ValueError, match=r"width=512.*missing keys.*\(and \d+ more\)"):
        load_vdvae(path)


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_vdvae(tmp_path / "nope.th")
    assert str(tmp_path / "nope.th") in str(err.value)
    assert CHECKPOINT_URL in str(err.value) and "imagenet64-iter-1600000-model-ema.th" in str(err.value)


class _Thing:  # not a tensor: weights-only loading must refuse it
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.th"
    torch.save({"x": _Thing()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        load_vdvae(path, config=VDVAEConfig.tiny())
