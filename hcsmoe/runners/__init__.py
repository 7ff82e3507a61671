"""How a recipe is run: layer by layer in memory, streaming from disk, or expert-parallel under torchrun."""
