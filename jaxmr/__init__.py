"""jaxmr: cross-modal (text <-> image) retrieval in JAX/Flax: train dual encoders, index them, serve search."""

__version__ = "0.1.0"
