"""sharpness: fast, exact Sharpness-Aware Minimization."""

from sharpness._core import __version__

__all__ = ["__version__"]
