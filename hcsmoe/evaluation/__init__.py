"""Measuring a compressed model against the original: perplexity, KL, generation, tasks, expert usage."""
