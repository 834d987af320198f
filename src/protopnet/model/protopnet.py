"""ProtoPNet: ``h o g_p o f`` (paper Section 2.1, Figure 2).

    image (B, 3, S, S)
      -> backbone f            (B, C, H, W)
      -> add-on 1x1 convs      (B, D, H, W)     = model.latent(x), sigmoid last
      -> distances to M prototypes (B, M, H', W')   squared L2, clamped at 0
      -> global min pooling    (B, M)           = min_distances
      -> similarity            (B, M)           log((d + 1) / (d + eps)) or -d
      -> last layer h (no bias) (B, K)          = logits
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from .backbones import build_backbone
from .distances import ACTIVATIONS, DISTANCES, distance_maps, min_pool, paired_distance_maps, similarity

logger = logging.getLogger(__name__)

ADD_ONS = ("regular", "bottleneck", "none")


class ProtoPNetOutput(NamedTuple):
    """What ``model(x)`` returns.

    Attributes:
        logits: (B, K) class scores.
        min_distances: (B, M) smallest squared distance from each prototype to any patch.
        similarities: (B, M) similarity of each prototype to its closest patch.
        distances: (B, M, H', W') the full distance maps.
    """

    logits: torch.Tensor
    min_distances: torch.Tensor
    similarities: torch.Tensor
    distances: torch.Tensor


def _add_on_layers(kind: str, in_channels: int, prototype_dim: int) -> nn.Sequential:
    """1x1 convolutions with ReLU between and a sigmoid after the last (paper Section 2.1).

    ``regular``: C -> D -> D. ``bottleneck``: halve the channels step by step down to D, each step a
    pair of 1x1 convolutions, as the reference implementation does. ``none`` (beyond the paper): no
    layers, the prototypes live in the backbone's own feature space (D must equal C), so whatever
    structure the backbone keeps (parts, with an angle: ``distance="cosine"``) is not re-learned.
    """
    if kind == "none":
        if prototype_dim != in_channels:
            raise ValueError(
                f"add_on 'none' keeps the backbone's {in_channels} channels: prototype_dim must be {in_channels}, got {prototype_dim}"
            )
        return nn.Sequential()
    if kind == "regular":
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, prototype_dim, 1),
            nn.ReLU(),
            nn.Conv2d(prototype_dim, prototype_dim, 1),
            nn.Sigmoid(),
        ]
    elif kind == "bottleneck":
        layers = []
        channels = in_channels
        while channels > prototype_dim or not layers:
            out = max(prototype_dim, channels // 2)
            layers += [nn.Conv2d(channels, out, 1), nn.ReLU(), nn.Conv2d(out, out, 1)]
            layers.append(nn.ReLU() if out > prototype_dim else nn.Sigmoid())
            channels = out
    else:
        raise ValueError(f"unknown add_on {kind!r}; choose one of {ADD_ONS}")
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class ProtoPNet(nn.Module):
    """A prototypical part network.

    Args (keyword only):
        backbone: a name from :func:`protopnet.model.available_backbones` or ``timm/<name>``.
        num_classes: K.
        prototypes_per_class: m_k, the same for every class (paper: 10).
        prototype_dim: D, channels of the latent space (paper: 128, 256 or 512).
        prototype_size: (h, w) of each prototype in latent cells (paper: (1, 1)).
        add_on: ``regular``, ``bottleneck`` or ``none`` (see :func:`_add_on_layers`).
        activation: ``log`` (paper) or ``linear``.
        distance: ``l2`` (paper: squared L2 distance) or ``cosine`` (one minus the cosine between
            prototype and patch, Huang et al. ICCV 2023): a patch's direction, not its norm, decides.
        pretrained: load the backbone's ImageNet weights through torchvision.
        epsilon: the epsilon of the log activation.
        class_names: K names (default ``class_0`` ...).
        prototype_classes: explicit class of each prototype (M,), e.g. after pruning; overrides
            ``prototypes_per_class``.
    """

    def __init__(
        self,
        *,
        backbone: str = "resnet34",
        num_classes: int = 200,
        prototypes_per_class: int = 10,
        prototype_dim: int = 128,
        prototype_size: Sequence[int] = (1, 1),
        add_on: str = "regular",
        activation: str = "log",
        distance: str = "l2",
        pretrained: bool = True,
        epsilon: float = 1e-4,
        class_names: Sequence[str] | None = None,
        prototype_classes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if prototype_classes is None and prototypes_per_class < 1:
            raise ValueError(f"prototypes_per_class must be >= 1, got {prototypes_per_class}")
        if prototype_dim < 1:
            raise ValueError(f"prototype_dim must be >= 1, got {prototype_dim}")
        prototype_size = tuple(int(s) for s in prototype_size)
        if len(prototype_size) != 2 or min(prototype_size) < 1:
            raise ValueError(f"prototype_size must be two positive integers (h, w), got {prototype_size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")

        self.backbone_name = backbone
        self.num_classes = int(num_classes)
        self.prototype_dim = int(prototype_dim)
        self.prototype_size = prototype_size
        self.add_on_kind = add_on
        self.activation = activation
        self.distance = distance
        self.epsilon = float(epsilon)
        self.class_names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(num_classes)]

        built = build_backbone(backbone, pretrained=pretrained)
        self.features = built.module
        self.feature_channels = int(built.out_channels)
        self.mean, self.std, self.stride = built.mean, built.std, built.stride
        self.add_on = _add_on_layers(add_on, built.out_channels, prototype_dim)

        if prototype_classes is None:
            classes = torch.arange(num_classes).repeat_interleave(prototypes_per_class)
        else:
            classes = torch.as_tensor(list(prototype_classes), dtype=torch.long)
            if classes.dim() != 1 or (classes.numel() and (classes.min() < 0 or classes.max() >= num_classes)):
                raise ValueError(f"prototype_classes must be class indices in [0, {num_classes}), got {list(prototype_classes)[:10]}...")
        m = classes.numel()
        self.register_buffer("prototype_classes", classes, persistent=True)
        # Reference initialisation: uniform in [0, 1), the sigmoid's range.
        self.prototypes = nn.Parameter(torch.rand(m, prototype_dim, *prototype_size))
        self.last_layer = nn.Linear(m, num_classes, bias=False)
        self.reset_last_layer()
        self.provenance: list[dict[str, Any]] | None = None  # filled by push
        self.history: list[dict[str, Any]] = []  # edits, pruning, pushes
        self.image_size = 224  # the input side the model was trained at (set by training / loading)
        self.source_directory: str | None = None  # the model directory it was loaded from

    # -- sharing --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: Any, *, device: Any = "cpu", revision: str | None = None, **hub_kwargs: Any) -> "ProtoPNet":
        """Load a ProtoPNet from a model directory, ``hf://OWNER/NAME[@REVISION]`` or ``OWNER/NAME``
        on the Hugging Face Hub (``pip install 'protopnet[hub]'``); see :mod:`protopnet.hub`.
        ``hub_kwargs``: ``cache_dir``, ``local_files_only``, ``token``."""
        from ..checkpoint import CheckpointError
        from ..hub import load_pretrained

        model = load_pretrained(name_or_path, device, revision=revision, **hub_kwargs)
        if not isinstance(model, cls):
            raise CheckpointError(f"{name_or_path}: not a single {cls.__name__} (it holds a {type(model).__name__}); load it with protopnet.load_model")
        return model

    def save_pretrained(self, directory: Any, **kwargs: Any) -> Any:
        """Write this model as a model directory (tensors, JSON, pictures, model card): the same
        as :func:`protopnet.save_model` (``kwargs``: ``dataset``, ``run_config``, ``extra``); push
        it with ``protopnet push-to-hub DIRECTORY OWNER/NAME``."""
        from ..save import save_model

        return save_model(self, directory, **kwargs)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def class_identity(self) -> torch.Tensor:
        """(M, K) one-hot float matrix: 1 where prototype j belongs to class k."""
        eye = torch.zeros(self.num_prototypes, self.num_classes, device=self.prototypes.device)
        eye[torch.arange(self.num_prototypes, device=eye.device), self.prototype_classes] = 1.0
        return eye

    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this architecture (with ``pretrained=False``)."""
        return {
            "backbone": self.backbone_name,
            "num_classes": self.num_classes,
            "prototype_dim": self.prototype_dim,
            "prototype_size": list(self.prototype_size),
            "add_on": self.add_on_kind,
            "activation": self.activation,
            "distance": self.distance,
            "epsilon": self.epsilon,
            "class_names": list(self.class_names),
            "prototype_classes": self.prototype_classes.tolist(),
        }

    # -- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def reset_last_layer(self, incorrect_class_connection: float = -0.5) -> None:
        """w_h(k, j) = 1 for prototype j of class k, ``incorrect_class_connection`` otherwise."""
        identity = self.class_identity.t()  # (K, M)
        self.last_layer.weight.copy_(identity + incorrect_class_connection * (1 - identity))

    @torch.no_grad()
    def set_prototypes(
        self,
        prototypes: torch.Tensor,
        prototype_classes: torch.Tensor,
        last_layer_weight: torch.Tensor,
    ) -> None:
        """Replace the prototype set (pruning, editing, ensembling).

        Args:
            prototypes: (M', D, h, w).
            prototype_classes: (M',) long.
            last_layer_weight: (K, M').
        """
        m = prototypes.shape[0]
        if prototypes.shape[1:] != self.prototypes.shape[1:]:
            raise ValueError(f"prototypes must be (M, {self.prototype_dim}, {self.prototype_size[0]}, {self.prototype_size[1]}), got {tuple(prototypes.shape)}")
        if prototype_classes.shape != (m,) or last_layer_weight.shape != (self.num_classes, m):
            raise ValueError("prototype_classes must be (M,) and last_layer_weight (K, M)")
        device = self.prototypes.device
        self.prototypes = nn.Parameter(prototypes.detach().clone().to(device))
        self.prototype_classes = prototype_classes.detach().clone().long().to(device)
        self.last_layer = nn.Linear(m, self.num_classes, bias=False).to(device)
        self.last_layer.weight.copy_(last_layer_weight)

    # -- forward ------------------------------------------------------------------------------
    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, D, H, W) latent map the prototypes live in."""
        return self.add_on(self.features(x))

    def distances(self, z: torch.Tensor, prototypes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D, H, W) latent -> (B, M, H', W') distances (float32) of the model's kind
        (squared L2 or cosine), to ``prototypes`` (M, D, h, w) when given, else to its own."""
        return distance_maps(z, self.prototypes if prototypes is None else prototypes, self.distance)

    def paired_distances(self, z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """(M, D, H, W) latent maps, (M, D, h, w) prototypes -> (M, H', W'): prototype j on map j."""
        return paired_distance_maps(z, prototypes, self.distance)

    def similarity(self, distances: torch.Tensor) -> torch.Tensor:
        """Distances (any shape) -> similarities of the same shape."""
        return similarity(distances, self.activation, self.epsilon)

    def head(self, z: torch.Tensor) -> ProtoPNetOutput:
        """Everything after the latent map: (B, D, H, W) -> :class:`ProtoPNetOutput`."""
        distances = self.distances(z)  # (B, M, H', W')
        min_distances = min_pool(distances)  # (B, M)
        similarities = self.similarity(min_distances)  # (B, M)
        logits = self.last_layer(similarities.to(self.last_layer.weight.dtype))  # (B, K)
        return ProtoPNetOutput(logits, min_distances, similarities, distances)

    def forward(self, x: torch.Tensor) -> ProtoPNetOutput:
        """(B, 3, S, S) normalised images -> :class:`ProtoPNetOutput`."""
        return self.head(self.latent(x))

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone_name!r}, num_classes={self.num_classes}, "
            f"num_prototypes={self.num_prototypes}, prototype_shape={tuple(self.prototypes.shape[1:])}, "
            f"distance={self.distance!r}, activation={self.activation!r}"
        )
