"""Before 0.5.0 the offline preprocessing of raw scans lived here; it is now
data/preprocess.py, the module of `maediff preprocess`. Importing this name still works,
with a warning."""

import warnings

from .preprocess import *  # noqa: F403
from .preprocess import RawOptions, crop_to_brain, n4_bias_correction, preprocess_scan  # noqa: F401

warnings.warn(
    "maediff.data.raw moved to maediff.data.preprocess in 0.5.0", DeprecationWarning, stacklevel=2
)
