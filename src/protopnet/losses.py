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


CLUSTER_OVER = ("nearest", "every")


def cluster_cost(
    min_distances: torch.Tensor, labels: torch.Tensor, class_identity: torch.Tensor, over: str = "nearest"
) -> torch.Tensor:
    """Mean over images of the smallest distance to a prototype of the image's own class.

    With ``over="every"`` (beyond the paper) the mean over images of the *average*, over every
    prototype of the image's class, of that prototype's smallest distance to the image: each
    prototype is asked to find its match in every picture of its class, not only the one that is
    already closest, so a prototype that fits only a few pictures (a background patch, one
    bird's pose) is pulled towards what all of them share. An image whose class has no
    prototype (after pruning) adds 0.

    Args:
        min_distances: (B, M) squared distances after min pooling.
        labels: (B,) class indices.
        class_identity: (M, K) one-hot prototype classes.
        over: ``nearest`` (the paper) or ``every``.

    Returns:
        scalar tensor.
    """
    if over not in CLUSTER_OVER:
        raise ValueError(f"cluster cost over {over!r}: choose one of {CLUSTER_OVER}")
    if over == "every":
        correct = class_identity[:, labels].t().to(min_distances.dtype)  # (B, M)
        return ((min_distances * correct).sum(dim=1) / correct.sum(dim=1).clamp_min(1)).mean()
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
    cluster_over: str = "nearest",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and each term's value (detached scalar tensors, for logging: no device sync).

    Args:
        logits: (B, K). min_distances: (B, M). labels: (B,). class_identity: (M, K).
        last_layer_weight: (K, M).
        use_cluster_separation: False in the last-layer stage (CE + L1 only).
        cluster_over: which own-class prototypes the cluster cost pulls (:func:`cluster_cost`).
    """
    ce = F.cross_entropy(logits.float(), labels)
    l1 = l1_wrong_class(last_layer_weight, class_identity)
    loss = coefficients.ce * ce + coefficients.l1 * l1
    terms = {"ce": ce.detach(), "l1": l1.detach()}
    if use_cluster_separation:
        clst = cluster_cost(min_distances, labels, class_identity, cluster_over)
        sep = separation_cost(min_distances, labels, class_identity)
        loss = loss + coefficients.cluster * clst + coefficients.separation * sep
        with torch.no_grad():
            avg_sep = average_separation(min_distances, labels, class_identity)
        terms.update(cluster=clst.detach(), separation=sep.detach(), avg_separation=avg_sep)
    terms["loss"] = loss.detach()
    return loss, terms


def focal_cost(distances: torch.Tensor, labels: torch.Tensor, class_identity: torch.Tensor) -> torch.Tensor:
    """ProtoPool's focal similarity as a cost (Rymarczyk et al., ECCV 2022; beyond the paper).

    ProtoPool scores a prototype by its largest similarity *minus its mean similarity* over the
    picture, which asks for one clear peak instead of a prototype that is nearly as close to
    every cell. Here the score stays the paper's (the largest similarity); the same ask is a
    cost on the distance maps: for every image and every prototype of its class, the smallest
    distance minus the mean distance over the cells, ``min(d) - mean(d) <= 0``, averaged.
    Minimising it pushes a prototype away from the picture's typical cell while the cluster cost
    keeps its best cell close. With the linear similarity (``-d``) ``mean(d) - min(d)`` is exactly
    ProtoPool's focal similarity. Meant for the bounded cosine distance (for squared L2 it has
    no lower bound, so :class:`protopnet.config.Config` refuses that combination).

    Args:
        distances: (B, M, H, W) prototype distance maps.
        labels: (B,) class indices. class_identity: (M, K) one-hot prototype classes.

    Returns:
        scalar tensor <= 0 (0 when no image has a prototype of its class).
    """
    flat = distances.flatten(2).float()  # (B, M, H*W)
    contrast = flat.amin(dim=2) - flat.mean(dim=2)  # (B, M) <= 0
    own = class_identity[:, labels].t().to(contrast.dtype)  # (B, M)
    return (contrast * own).sum() / own.sum().clamp_min(1.0)


def stability_cost(clean: torch.Tensor, noisy: torch.Tensor, labels: torch.Tensor, class_identity: torch.Tensor) -> torch.Tensor:
    """Stability training (Zheng et al., CVPR 2016; beyond the paper): a prototype's distance map
    on a picture should not change when small Gaussian noise is added to the picture.

    For every image and every prototype of its class, the squared change of the map over its
    cells divided by the clean map's spread over its cells (``sum (d_noisy - d_clean)^2 /
    sum (d_clean - mean d_clean)^2``), averaged: a noise-to-signal ratio of the map, free of the
    distance's scale. It is small when the noise moves no cell by much compared with how much
    the cells differ, so the peak (and where upsampling puts it) stays. Gradients reach both maps.

    Args:
        clean: (B, M, H, W) distance maps of the pictures. noisy: (B, M, H, W) of the same
            pictures with noise added.
        labels: (B,) class indices. class_identity: (M, K) one-hot prototype classes.

    Returns:
        scalar tensor >= 0 (0 when no image has a prototype of its class).
    """
    if clean.shape != noisy.shape:
        raise ValueError(f"clean and noisy distance maps differ in shape: {tuple(clean.shape)} vs {tuple(noisy.shape)}")
    c = clean.flatten(2).float()  # (B, M, H*W)
    n = noisy.flatten(2).float()
    change = (n - c).pow(2).sum(dim=2)  # (B, M)
    spread = (c - c.mean(dim=2, keepdim=True)).pow(2).sum(dim=2)
    ratio = change / spread.clamp_min(1e-6)
    own = class_identity[:, labels].t().to(ratio.dtype)  # (B, M)
    return (ratio * own).sum() / own.sum().clamp_min(1.0)


def to_latent_grid(shallow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, Hs, Ws) shallow features -> (B, C', H, W) on the latent grid ``size``: each latent
    cell gets the shallow cells it covers stacked as channels (space-to-depth,
    ``C' = C * (Hs / H) * (Ws / W)``) when the sides divide, else their average
    (``C' = C``)."""
    h, w = int(size[0]), int(size[1])
    hs, ws = shallow.shape[-2:]
    if (hs, ws) == (h, w):
        return shallow
    if hs % h == 0 and ws % w == 0 and hs // h == ws // w:
        return F.pixel_unshuffle(shallow, hs // h)
    return F.adaptive_avg_pool2d(shallow, (h, w))


def _cosine_self_similarity(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, N) cosine similarity between the N = H * W cells of each image."""
    cells = F.normalize(features.flatten(2).float(), dim=1)  # (B, C, N)
    return cells.transpose(1, 2) @ cells


def alignment_cost(
    distances: torch.Tensor,
    labels: torch.Tensor,
    class_identity: torch.Tensor,
    shallow: torch.Tensor,
    deep: torch.Tensor,
    threshold: float = 0.1,
) -> torch.Tensor:
    """Shallow-deep feature alignment (Huang et al., ICCV 2023, "SDFA"; beyond the paper).

    A deep latent cell sees most of the picture, so the cell where a prototype peaks need not be
    where the part is. This cost asks the deep features to keep the spatial similarity structure
    of shallow, local features *around the peaks that matter*: for every image and every
    prototype of its class, the row of the deep cells' cosine self-similarity at the prototype's
    closest cell should differ from the same row of the shallow features' self-similarity by at
    most ``threshold``; the cost is the mean excess, ``mean(relu(|S_deep - S_shallow| - t))``.
    The shallow features are constants (no gradient).

    Args:
        distances: (B, M, H, W) prototype distance maps (their argmin picks the rows; no gradient).
        labels: (B,) class indices. class_identity: (M, K) one-hot prototype classes.
        shallow: (B, Cs, Hs, Ws) features of an early backbone block (stride about 8).
        deep: (B, Cd, H, W) the backbone's output, on the same grid as ``distances``.
        threshold: the tolerated difference of two cosine similarities.

    Returns:
        scalar tensor (0 when no image has a prototype of its class).
    """
    b, m, h, w = distances.shape
    if deep.shape[-2:] != (h, w):
        raise ValueError(f"deep features on a {tuple(deep.shape[-2:])} grid but distance maps on {(h, w)}")
    s_shallow = _cosine_self_similarity(to_latent_grid(shallow.detach(), (h, w)))  # (B, N, N)
    s_deep = _cosine_self_similarity(deep)  # (B, N, N)
    with torch.no_grad():
        peaks = distances.flatten(2).argmin(dim=2)  # (B, M) closest cell of each prototype
        own = class_identity[:, labels].t() > 0  # (B, M)
    rows = peaks[..., None].expand(b, m, h * w)  # (B, M, N)
    gap = (s_deep.gather(1, rows) - s_shallow.gather(1, rows)).abs()  # (B, M, N)
    excess = F.relu(gap - float(threshold)).mean(dim=2)  # (B, M)
    weight = own.to(excess.dtype)
    return (excess * weight).sum() / weight.sum().clamp_min(1.0)


def diversity_cost(prototypes: torch.Tensor, class_identity: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Keeps a class's prototypes apart (beyond the paper; akin to TesNet's orthogonality,
    Wang et al., ICCV 2021, and Deformable ProtoPNet's, Donnelly et al., CVPR 2022, with a margin).

    A class's prototypes are trained by the same pictures towards the same evidence, and push
    snaps each to its nearest training patch: prototypes that drifted together land on the *same*
    patch, and the score sheet shows one part several times. For every pair of prototypes of one
    class whose cosine similarity exceeds ``margin``, the cost is the squared excess,
    ``relu(cos(p_j, p_l) - margin)^2``, summed over the class's unordered pairs and averaged over
    the classes. Pairs at most ``margin`` alike cost nothing, so prototypes of related parts may
    stay close; copies (cosine 1) cost most. It depends on the prototypes alone, not the batch.
    Exact copies are a stationary point (the cosine's gradient vanishes at 1), so the cost keeps
    prototypes from drifting together during training; it does not part copies a push made.

    Args:
        prototypes: (M, D, h, w) prototype vectors (or any (M, ...); flattened per prototype).
        class_identity: (M, K) one-hot prototype classes.
        margin: the cosine similarity in [-1, 1) a pair may reach at no cost.

    Returns:
        scalar tensor >= 0 (0 when no class has two prototypes closer than the margin).
    """
    if not -1.0 <= margin < 1.0:
        raise ValueError(f"diversity margin {margin}: expected a cosine similarity in [-1, 1)")
    unit = F.normalize(prototypes.flatten(1).float(), dim=1)  # (M, D*h*w)
    cosine = unit @ unit.t()  # (M, M)
    identity = class_identity.to(cosine.dtype)
    same_class = torch.triu(identity @ identity.t(), diagonal=1)  # (M, M): pairs j < l of one class
    excess = F.relu(cosine - float(margin)).pow(2) * same_class
    return excess.sum() / max(class_identity.shape[1], 1)
