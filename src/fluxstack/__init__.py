"""fluxstack: reproducible FLUX.1 deployments on one verified weight store."""

__version__ = "0.1.0"
