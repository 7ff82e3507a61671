"""Stage 2, plan: every method is a planner that turns a layer's statistics into groups of experts."""
