"""SAEs on ViTs: splicing SAELens SAEs into a HookedViT (and, later, loaders for shared checkpoints)."""
