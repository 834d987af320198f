"""The training objective (paper Section 2.2).

    loss = ce * CrossEntropy + cluster * Clst + separation * Sep + l1 * L1

with the paper's Clst and Sep written the way the reference implementation computes them
(``max_dist - max((max_dist - d) * mask)``, which also handles a class with no prototypes),
and ``separation`` a negative coefficient (default -0.08): minimising ``-0.08 * Sep`` pushes
other-class prototypes away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossCoefficients:
    """Weights of each term (reference defaults)."""

    ce: float = 1.0
    cluster: float = 0.8
    separation: float = -0.08
    l1: float = 1e-4


def cluster_cost(min_distances: torch.Tensor, labels: torch.Tensor, class_identity: torch.Tensor) -> torch.Tensor:
    """Mean over images of the smallest distance to a prototype of the image's own class.

    Args:
        min_distances: (B, M) squared distances after min pooling.
        labels: (B,) class indices.
        class_identity: (M, K) one-hot prototype classes.

    Returns:
        scalar tensor.
    """
    max_dist = _max_distance(min_distances)
    correct = class_identity[:, labels].t()  # (B, M)
    inverted = torch.amax((max_dist - min_distances) * correct, dim=1)  # (B,)
    return (max_dist - inverted).mean()


def separation_cost(min_distances: torch.Tensor, labels: torch.Tensor, class_identity: torch.Tensor) -> torch.Tensor:
    """Mean over images of the smallest distance to a prototype of another class (the paper's
    Sep without its minus sign; the coefficient carries the sign). Shapes as :func:`cluster_cost`."""
    max_dist = _max_distance(min_distances)
    incorrect = 1 - class_identity[:, labels].t()  # (B, M)
    inverted = torch.amax((max_dist - min_distances) * incorrect, dim=1)  # (B,)
    return (max_dist - inverted).mean()


def average_separation(min_distances: torch.Tensor, labels: torch.Tensor, class_identity: torch.Tensor) -> torch.Tensor:
    """Mean over images of the *average* distance to other-class prototypes (logged, not trained)."""
    incorrect = 1 - class_identity[:, labels].t()  # (B, M)
    per_image = (min_distances * incorrect).sum(dim=1) / incorrect.sum(dim=1).clamp_min(1)
    return per_image.mean()


def l1_wrong_class(last_layer_weight: torch.Tensor, class_identity: torch.Tensor) -> torch.Tensor:
    """Sum of |w_h(k, j)| over prototypes j not of class k. last_layer_weight: (K, M)."""
    return (last_layer_weight * (1 - class_identity.t())).abs().sum()


def _max_distance(min_distances: torch.Tensor) -> torch.Tensor:
    # Any value >= every distance works; the reference uses D*h*w (the sigmoid latent's bound).
    # Using the batch maximum keeps the formula exact even when prototypes leave [0, 1]^D.
    return min_distances.detach().amax().clamp_min(1.0) + 1.0


def protopnet_loss(
    logits: torch.Tensor,
    min_distances: torch.Tensor,
    labels: torch.Tensor,
    class_identity: torch.Tensor,
    last_layer_weight: torch.Tensor,
    coefficients: LossCoefficients = LossCoefficients(),
    use_cluster_separation: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and each term's value (detached scalar tensors, for logging: no device sync).

    Args:
        logits: (B, K). min_distances: (B, M). labels: (B,). class_identity: (M, K).
        last_layer_weight: (K, M).
        use_cluster_separation: False in the last-layer stage (CE + L1 only).
    """
    ce = F.cross_entropy(logits.float(), labels)
    l1 = l1_wrong_class(last_layer_weight, class_identity)
    loss = coefficients.ce * ce + coefficients.l1 * l1
    terms = {"ce": ce.detach(), "l1": l1.detach()}
    if use_cluster_separation:
        clst = cluster_cost(min_distances, labels, class_identity)
        sep = separation_cost(min_distances, labels, class_identity)
        loss = loss + coefficients.cluster * clst + coefficients.separation * sep
        with torch.no_grad():
            avg_sep = average_separation(min_distances, labels, class_identity)
        terms.update(cluster=clst.detach(), separation=sep.detach(), avg_separation=avg_sep)
    terms["loss"] = loss.detach()
    return loss, terms
