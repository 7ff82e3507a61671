"""hcsmoe: make sparse Mixture-of-Experts models smaller by merging their experts (HC-SMoE)."""

__version__ = "0.1.0"

from hcsmoe.pipeline import CompressionResult, compress  # noqa: E402

__all__ = ["CompressionResult", "compress", "__version__"]
