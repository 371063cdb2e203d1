"""Feature spaces decoded from fMRI (VDVAE latents, CLIP-text and CLIP-vision embeddings) and their store.

Import-light on purpose: importing this package pulls in numpy only. Model code (``vdvae``, ``clip``) lives
in its own modules and is imported explicitly by whoever needs it.
"""
from .store import FeatureStore, FeatureWriter, read_safetensors_memmap, write_features

__all__ = ["FeatureStore", "FeatureWriter", "write_features", "read_safetensors_memmap"]
