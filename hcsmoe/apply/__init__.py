"""Stage 3, apply: weight surgery that turns a plan's groups into merged experts and router rows."""
