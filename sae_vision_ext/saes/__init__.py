"""SAEs on ViTs: loading (every shared checkpoint format), the affine view used by attribution, evaluation."""
