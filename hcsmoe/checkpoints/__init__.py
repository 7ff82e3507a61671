"""Reading and writing checkpoints: architectures (where each family keeps its MoE parts), stored formats, shards, loading and saving."""
