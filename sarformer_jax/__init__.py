"""sarformer-jax: SARFormer semantic segmentation in JAX/Flax."""

__version__ = "0.1.0"
