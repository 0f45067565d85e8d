"""The expression CNN's shape, shared by the Keras net (models.net) and its PyTorch copy (models.train_torch)."""
from __future__ import annotations

# Stage widths and convolutions per stage: small at 48x48 where convs are costly, wide at 6x6.
WIDTHS = {"tiny": (8, 16, 16, 32), "small": (32, 64, 128, 256), "base": (48, 96, 192, 384)}
CONVS_PER_STAGE = (1, 2, 2, 2)
DENSE_UNITS = 256
# FER2013 pixel statistics (mean ~0.51, std ~0.25 on [0, 1]); fixed, so no adapt() step.
PIXEL_MEAN, PIXEL_STD = 0.51, 0.25
BN_EPSILON = 1e-3   # Keras' default; the PyTorch copy must use the same
