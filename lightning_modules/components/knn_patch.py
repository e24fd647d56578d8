"""k-nearest-neighbour patch anomaly scoring against a memory bank of normal patch features.

The memory bank holds every patch feature of the normal images it was fitted on; a query patch's
score is its mean Euclidean distance to its k nearest bank entries (k=1: PatchCore without coreset
subsampling). Distances are computed in chunks of the bank, so memory does not grow with its size.
"""

from __future__ import annotations

import torch
from torch import nn


class KNNPatchScorer(nn.Module):
    """Args:
        k: neighbours averaged for a patch's score.
        chunk_size: bank entries per distance chunk.
    """

    def __init__(self, k: int = 1, chunk_size: int = 8192) -> None:
        super().__init__()
        if k < 1 or chunk_size < 1:
            raise ValueError(f"need k >= 1 and chunk_size >= 1, got k={k}, chunk_size={chunk_size}")
        self.k = k
        self.chunk_size = chunk_size
        self.register_buffer("bank", torch.empty(0), persistent=False)

    @property
    def is_fitted(self) -> bool:
        return self.bank.numel() > 0

    def fit(self, patches: torch.Tensor) -> None:
        """patches [N, D] of normal images."""
        if patches.ndim != 2 or patches.shape[0] < self.k:
            raise ValueError(f"need a [N, D] bank with N >= k={self.k}, got shape {tuple(patches.shape)}")
        self.bank = patches.detach().float()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [..., D] -> mean distance to the k nearest bank entries [...]."""
        if not self.is_fitted:
            raise RuntimeError("KNNPatchScorer: call fit() on normal patch features before scoring")
        flat = patches.reshape(-1, patches.shape[-1]).float()
        nearest = None
        for start in range(0, self.bank.shape[0], self.chunk_size):
            distances = torch.cdist(flat, self.bank[start:start + self.chunk_size])
            candidates = distances if nearest is None else torch.cat([nearest, distances], dim=1)
            nearest = candidates.topk(min(self.k, candidates.shape[1]), dim=1, largest=False).values
        return nearest.mean(1).reshape(patches.shape[:-1])
