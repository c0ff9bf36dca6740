"""Writes images.npz: scikit-learn's bundled digits as 3x32x32 colour images, a dataset of the package's shape.

    python make_dataset.py images.npz

Arrays: ``images`` FP32[1797, 3, 32, 32] in [0, 1] (each 8x8 pixel repeated 4x4, the grey copied to 3 channels,
with a little noise so no two copies are alike) and ``y`` INT64[1797], the digit.
"""
import sys

import numpy as np
from sklearn.datasets import load_digits


def make(seed: int = 0) -> dict[str, np.ndarray]:
    digits = load_digits()
    images = np.kron(digits.images / 16.0, np.ones((4, 4)))
    images = np.repeat(images[:, None], 3, axis=1)
    images += np.random.default_rng(seed).normal(0, 0.05, images.shape)
    return {"images": images.clip(0, 1).astype(np.float32), "y": digits.target.astype(np.int64)}


if __name__ == "__main__":
    np.savez(sys.argv[1] if len(sys.argv) > 1 else "images.npz", **make())
