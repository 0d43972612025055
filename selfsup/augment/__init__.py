"""Batched, seeded image augmentation: per-sample ops (`ops`), per-paper view presets (`views`)."""

from selfsup.augment import ops, views
from selfsup.augment.views import MultiView, ViewSpec

__all__ = ["MultiView", "ViewSpec", "ops", "views"]
