"""Model families, loading and the loss; `register` adds a user's own family (docs/models.md)."""

from .registry import FamilySpec, register

__all__ = ["FamilySpec", "register"]
