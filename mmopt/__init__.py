"""mmopt: trained multimodal PyTorch models to fast, verified deployment artifacts."""

__version__ = "0.1.0"

__all__ = ["__version__"]
