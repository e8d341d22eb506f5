"""A robust fence on the rows selection clusters (source prompts): one user's row far out cannot move everyone.

K-means, PCA and farthest-point sampling are all driven by squared distances: one prompt scaled by 1e6 takes a
cluster of its own (K-means), the first principal axis (PCA) or the first pick (FPS), and the other users are
clustered by what is left. Rows whose L2 norm lies beyond median + FENCE_MADS x MAD of all rows' norms are left out
of fitting those statistics and clipped to the fence where they are assigned; the others never see them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Why 10: source prompts of one store sit within a few x of each other's norm, so a fence 10 MADs out never clips
# a genuine user (random Gaussian rows: never), while a row scaled by even 10x is far beyond it.
FENCE_MADS = 10.0


@dataclass
class RowFence:
    limit: float  # rows with a larger L2 norm are outliers: left out of fitting, clipped to this norm elsewhere

    @classmethod
    def fit(cls, x: np.ndarray, mads: float = FENCE_MADS) -> "RowFence":
        norms = _norms(x)
        finite = norms[np.isfinite(norms)]
        if not len(finite):
            return cls(np.inf)
        median = float(np.median(finite))
        mad = float(np.median(np.abs(finite - median)))
        # identical norms (MAD 0): fence a relative step out, so float noise is never an outlier
        return cls(median + mads * max(mad, 1e-3 * median))

    def inliers(self, x: np.ndarray) -> np.ndarray:
        return _norms(x) <= self.limit

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The rows with every outlier scaled down onto the fence (a copy only when one is)."""
        norms = _norms(x)
        over = norms > self.limit
        if not over.any():
            return x
        out = np.array(x, dtype=np.float32)
        out[over] *= (self.limit / norms[over])[:, None].astype(np.float32)
        return out


def fence_rows(x: np.ndarray) -> np.ndarray:
    """`x` (n, features) with rows beyond its own fence clipped onto it."""
    return RowFence.fit(x).apply(x)


def _norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(x, dtype=np.float64).reshape(len(x), -1), axis=1)


class FencedModel:
    """A fitted clustering model behind a fence: `predict` clips outliers first (what the Ray layer's actors call
    on each store shard, so they assign exactly as the driver does)."""

    def __init__(self, fence: RowFence, model):
        self.fence, self.model = fence, model

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(self.fence.apply(np.asarray(x, dtype=np.float32)))

    @property
    def cluster_centers_(self) -> np.ndarray:
        return self.model.cluster_centers_
