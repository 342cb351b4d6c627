"""diffusers' modules with this project's kernels swapped in, one file per module replaced.

`patch_model` (patch.py) applies them to a UNet2DConditionModel or an AutoencoderKL in place.
"""

from .patch import OPS, patch_model

__all__ = ["OPS", "patch_model"]
