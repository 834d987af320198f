"""Pure functions of the prototype layer ``g_p`` (paper Section 2.1).

Shapes: B images, D latent channels, H x W latent map, M prototypes of h x w patches,
H' = H - h + 1 and W' = W - w + 1 patch positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("log", "linear")
#: How a prototype's distance to a patch is measured: the paper's squared L2 distance, or one
#: minus the cosine of the angle between them (Huang et al., ICCV 2023; beyond the paper).
DISTANCES = ("l2", "cosine")


def _check_shapes(z: torch.Tensor, prototypes: torch.Tensor) -> None:
    if z.dim() != 4 or prototypes.dim() != 4:
        raise ValueError(f"expected z (B, D, H, W) and prototypes (M, D, h, w), got {tuple(z.shape)} and {tuple(prototypes.shape)}")
    if z.shape[1] != prototypes.shape[1]:
        raise ValueError(f"latent channels {z.shape[1]} != prototype channels {prototypes.shape[1]}")
    h, w = prototypes.shape[2], prototypes.shape[3]
    if h > z.shape[2] or w > z.shape[3]:
        raise ValueError(f"prototype size {h}x{w} is larger than the latent map {z.shape[2]}x{z.shape[3]}")


def _terms(z: torch.Tensor, prototypes: torch.Tensor, paired: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three float32 terms both distances are made of: ``||z||^2`` per patch (``z * z``
    summed over the channels once for all prototypes, then over each h x w window by an average
    pool), the cross term ``z.p`` (one convolution; a grouped one when ``paired``: prototype j
    against map j only) and ``||p||^2``, shaped to broadcast against the cross term:
    (B, 1, H', W'), (B, M, H', W'), (1, M, 1, 1), or when paired (M, H', W'), (M, H', W'),
    (M, 1, 1). Computed with autocast off: the cancellation in ``a - 2b + c`` is too lossy in
    bf16/fp16."""
    m, d, h, w = prototypes.shape
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        prototypes = prototypes.float()
        z_sq = (z * z).sum(dim=1, keepdim=True)  # (N, 1, H, W)
        if h != 1 or w != 1:
            z_sq = F.avg_pool2d(z_sq, (h, w), stride=1) * (h * w)  # (N, 1, H', W')
        p_sq = (prototypes * prototypes).sum(dim=(1, 2, 3))  # (M,)
        if paired:
            cross = F.conv2d(z.reshape(1, m * d, *z.shape[2:]), prototypes, groups=m)[0]  # (M, H', W')
            return z_sq[:, 0], cross, p_sq.view(-1, 1, 1)
        return z_sq, F.conv2d(z, prototypes), p_sq.view(1, -1, 1, 1)


def _check_paired(z: torch.Tensor, prototypes: torch.Tensor) -> None:
    if z.dim() != 4 or prototypes.dim() != 4 or z.shape[:2] != prototypes.shape[:2]:
        raise ValueError(f"expected z (M, D, H, W) and prototypes (M, D, h, w), got {tuple(z.shape)} and {tuple(prototypes.shape)}")


def _l2(z_sq: torch.Tensor, cross: torch.Tensor, p_sq: torch.Tensor) -> torch.Tensor:
    return F.relu(z_sq - 2 * cross + p_sq)


def _cosine(z_sq: torch.Tensor, cross: torch.Tensor, p_sq: torch.Tensor) -> torch.Tensor:
    norms = z_sq.clamp_min(0).sqrt().clamp_min(1e-12) * p_sq.sqrt().clamp_min(1e-12)
    return (1 - cross / norms).clamp(0.0, 2.0)


def l2_distance_maps(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance from every prototype to every patch of the latent map.

    Computed as ``||z||^2 - 2 z.p + ||p||^2`` clamped at 0 (:func:`_terms`), always in float32.

    Args:
        z: latent map (B, D, H, W).
        prototypes: (M, D, h, w) with h <= H and w <= W.

    Returns:
        distances (B, M, H', W').
    """
    _check_shapes(z, prototypes)
    return _l2(*_terms(z, prototypes, paired=False))


def paired_l2_distance_maps(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance from prototype j to every patch of latent map j, for every j at once:
    the diagonal of :func:`l2_distance_maps` over a stack of latent maps (push draws each pushed
    prototype's activation on its own source image this way), the cross term as one grouped
    convolution.

    Args:
        z: latent maps (M, D, H, W).
        prototypes: (M, D, h, w).

    Returns:
        distances (M, H', W').
    """
    _check_paired(z, prototypes)
    m, _, h, w = prototypes.shape
    if m == 0:
        return z.new_zeros(0, z.shape[2] - h + 1, z.shape[3] - w + 1, dtype=torch.float32)
    return _l2(*_terms(z, prototypes, paired=True))


def cosine_distance_maps(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """One minus the cosine between every prototype and every patch of the latent map.

    A patch is its ``h x w x D`` values flattened, as for :func:`l2_distance_maps`; the distance
    is ``1 - z.p / (||z|| ||p||)`` in ``[0, 2]`` (0: same direction), computed in float32 from the
    same terms with the norms clamped at 1e-12 (an all-zero patch is at distance 1 from everything).

    Args:
        z: latent map (B, D, H, W).
        prototypes: (M, D, h, w) with h <= H and w <= W.

    Returns:
        distances (B, M, H', W').
    """
    _check_shapes(z, prototypes)
    return _cosine(*_terms(z, prototypes, paired=False))


def paired_cosine_distance_maps(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The diagonal of :func:`cosine_distance_maps` over a stack of latent maps: prototype j
    against every patch of latent map j. z: (M, D, H, W), prototypes: (M, D, h, w) ->
    (M, H', W')."""
    _check_paired(z, prototypes)
    m, _, h, w = prototypes.shape
    if m == 0:
        return z.new_zeros(0, z.shape[2] - h + 1, z.shape[3] - w + 1, dtype=torch.float32)
    return _cosine(*_terms(z, prototypes, paired=True))


def distance_maps(z: torch.Tensor, prototypes: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """(B, D, H, W) latent, (M, D, h, w) prototypes -> (B, M, H', W') distances of ``kind``
    (one of :data:`DISTANCES`), float32."""
    if kind == "l2":
        return l2_distance_maps(z, prototypes)
    if kind == "cosine":
        return cosine_distance_maps(z, prototypes)
    raise ValueError(f"unknown distance {kind!r}; choose one of {DISTANCES}")


def paired_distance_maps(z: torch.Tensor, prototypes: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """(M, D, H, W) latent maps, (M, D, h, w) prototypes -> (M, H', W'): prototype j on map j."""
    if kind == "l2":
        return paired_l2_distance_maps(z, prototypes)
    if kind == "cosine":
        return paired_cosine_distance_maps(z, prototypes)
    raise ValueError(f"unknown distance {kind!r}; choose one of {DISTANCES}")


def similarity(distances: torch.Tensor, activation: str = "log", epsilon: float = 1e-4) -> torch.Tensor:
    """Turn squared distances (any shape) into similarities of the same shape.

    ``log``: ``log((d + 1) / (d + epsilon))`` (paper Section 2.1); ``linear``: ``-d``.
    """
    if activation == "log":
        return torch.log((distances + 1) / (distances + epsilon))
    if activation == "linear":
        return -distances
    raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def min_pool(distances: torch.Tensor) -> torch.Tensor:
    """Global min pooling: (B, M, H', W') -> (B, M)."""
    return distances.flatten(2).amin(dim=2)
