"""Helpers for comparing images and reading Triton's statistics."""

from __future__ import annotations

import numpy as np

# Served alone, an image is bit-identical to diffusers' pipeline on the same weights.
# Batched with other requests, a seed gives the same noise, but the UNet's GEMMs and
# the VAE's convolutions at another batch size round differently in the last float
# bit (CPU GEMM blocking; cuDNN algorithm choice on a GPU), which can move a pixel
# by one level after rounding to uint8.
MAX_PIXEL_DIFF = 1


def image_diff(actual: np.ndarray, expected: np.ndarray) -> str:
    """Describe the worst difference between two uint8 images (for assertion messages)."""
    if actual.shape != expected.shape:
        return f"shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    where = np.unravel_index(int(diff.argmax()), diff.shape)
    return f"max diff {int(diff.max())} at {tuple(int(i) for i in where)}, {int((diff > 0).sum())} of {diff.size} values differ"


def assert_same_image(actual: np.ndarray, expected: np.ndarray, max_diff: int = MAX_PIXEL_DIFF) -> None:
    assert actual.dtype == np.uint8 and expected.dtype == np.uint8
    assert actual.shape == expected.shape, image_diff(actual, expected)
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert int(diff.max()) <= max_diff, image_diff(actual, expected)


def model_counts(client, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of a model from Triton's statistics (gRPC client)."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
