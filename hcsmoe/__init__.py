"""hcsmoe: make sparse Mixture-of-Experts models smaller by merging their experts (HC-SMoE)."""

__version__ = "0.1.0"
__all__ = ["CompressionResult", "Recipe", "compress", "__version__"]


def __getattr__(name: str):
    """`hcsmoe.compress`, `hcsmoe.Recipe` and `hcsmoe.CompressionResult`, imported on first use so the CLI
    starts fast."""
    if name in ("compress", "CompressionResult", "Recipe"):
        from hcsmoe import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'hcsmoe' has no attribute {name!r}")
