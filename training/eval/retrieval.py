"""View-invariance metrics of subject embeddings (paper Fig. 7 / Table 4): retrieval and distance ratio."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _similarity(embeddings: Tensor) -> Tensor:
    x = F.normalize(embeddings.float().flatten(1), dim=-1)
    return x @ x.T


def top1_same_subject(embeddings: Tensor, labels: Tensor) -> float:
    """Fraction of views whose nearest other view (cosine) shows the same subject. Shapes: (N, ...), (N,)."""
    sim = _similarity(embeddings).fill_diagonal_(float("-inf"))
    return (labels[sim.argmax(1)] == labels).float().mean().item()


def mean_average_precision(embeddings: Tensor, labels: Tensor) -> float:
    """mAP of retrieving a view's same-subject views among all other views, ranked by cosine."""
    sim = _similarity(embeddings)
    n = len(labels)
    aps = []
    for i in range(n):
        others = torch.tensor([j for j in range(n) if j != i])
        order = others[sim[i, others].argsort(descending=True)]
        relevant = (labels[order] == labels[i]).float()
        if relevant.sum() == 0:
            continue
        precision = relevant.cumsum(0) / torch.arange(1, len(order) + 1)
        aps.append((precision * relevant).sum().item() / relevant.sum().item())
    return sum(aps) / len(aps)


def distance_ratio(embeddings: Tensor, labels: Tensor) -> float:
    """Mean intra-subject cosine distance / mean inter-subject cosine distance (lower: more view-invariant)."""
    dist = 1 - _similarity(embeddings)
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(len(labels), dtype=torch.bool)
    return (dist[same & off].mean() / dist[~same].mean()).item()


def pca_2d(embeddings: Tensor) -> Tensor:
    """A 2-D projection for plots (t-SNE is not in the dependency set). Shapes: (N, ...) -> (N, 2)."""
    x = F.normalize(embeddings.float().flatten(1), dim=-1)
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:2].T
