"""selfforcing: autoregressive video diffusion with Self Forcing (arXiv 2506.08009)."""

__version__ = "0.1.0"
