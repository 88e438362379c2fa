"""gpuvisor: virtual GPUs for multi-tenant AI inference on a shared device."""

__version__ = "0.1.0"
__all__ = ["__version__"]
