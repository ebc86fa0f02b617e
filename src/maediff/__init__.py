"""maediff: MAEDiff (Xu, Wang, Du 2024) for unsupervised anomaly detection in brain MRI."""

from .config import Config, get_preset, load_config, save_config
from .model import MAEDiff

__version__ = "0.1.0"

__all__ = ["Config", "MAEDiff", "__version__", "get_preset", "load_config", "save_config"]
