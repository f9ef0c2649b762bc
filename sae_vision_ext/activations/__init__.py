"""Harvesting activations from images: all hooks in one pass, token selection, shuffling."""
