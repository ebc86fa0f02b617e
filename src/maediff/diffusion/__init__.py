"""The diffusion side of the method, independent of any network: the forward process
(schedules, q_sample), the noise it uses (Gaussian, multi-octave simplex) and the
hierarchical patch partition of paper §3.2."""

from .noise import NoiseSampler
from .patches import PatchGrid
from .process import GaussianDiffusion

__all__ = ["GaussianDiffusion", "NoiseSampler", "PatchGrid"]
