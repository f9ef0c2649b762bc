"""Training SAELens SAEs on vision activations."""
