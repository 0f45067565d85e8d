"""The expression CNN: a VGG-style net for 48x48 gray faces, written in backend-agnostic Keras 3.

Input (N, 48, 48, 1) float32 in [0, 1]; the normalisation is a layer of the model so that every
caller (bot, evaluate, bench) feeds the same thing. Output (N, 7) softmax in core.emotions order.
"""
from __future__ import annotations

import keras
from keras import layers

from core.emotions import NUM_EMOTIONS
from models.net_shape import BN_EPSILON, CONVS_PER_STAGE, DENSE_UNITS, PIXEL_MEAN, PIXEL_STD, WIDTHS


def _conv_bn_relu(x, filters: int, name: str):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_model(width: str = "small", dropout: float = 0.4, dense: int = DENSE_UNITS, spatial_dropout: float = 0.1) -> keras.Model:
    """VGG-style: 4 stages of 3x3 conv+BN+ReLU with max-pooling 48->24->12->6->3, then a dense head."""
    widths = WIDTHS[width]
    inputs = keras.Input((48, 48, 1), name="face")
    x = layers.Rescaling(1 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="normalise")(inputs)
    for stage, (filters, convs) in enumerate(zip(widths, CONVS_PER_STAGE), start=1):
        for i in range(convs):
            x = _conv_bn_relu(x, filters, f"s{stage}c{i + 1}")
        x = layers.MaxPooling2D(2, name=f"s{stage}_pool")(x)
        if stage >= 2:
            x = layers.SpatialDropout2D(spatial_dropout * (stage - 1), name=f"s{stage}_drop")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(dropout, name="head_drop1")(x)
    x = layers.Dense(dense, use_bias=False, name="head_dense")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="head_bn")(x)
    x = layers.ReLU(name="head_relu")(x)
    x = layers.Dropout(dropout, name="head_drop2")(x)
    x = layers.Dense(NUM_EMOTIONS, name="logits")(x)
    # Softmax in float32 so mixed_bfloat16 training keeps a numerically sound output.
    outputs = layers.Activation("softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name=f"classmood_{width}")
