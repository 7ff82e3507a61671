"""Stage 4, fit: the compressed layer fitted to the original layer's output (router, down projections, experts)."""
