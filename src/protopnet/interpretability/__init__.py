"""Measures of interpretability, not only accuracy."""

from .localization import prototype_localization

__all__ = ["prototype_localization"]
