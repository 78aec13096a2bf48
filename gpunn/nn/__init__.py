"""The model layer (issue 5 grows it): parameters so far."""

from .parameter import Parameter

__all__ = ["Parameter"]
