"""Brain-Diffuser Explorer core library: fMRI -> VDVAE + CLIP features -> Versatile Diffusion images.

Never imports streamlit; the app in ``app.py``/``pages/`` is a thin layer over this package.
"""
from .config import PAPER, FEATURE_NAMES

__version__ = "0.1.0"
__all__ = ["PAPER", "FEATURE_NAMES", "__version__"]
