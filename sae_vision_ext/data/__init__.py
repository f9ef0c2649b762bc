"""Image data: the procedural shapes set and preprocessing helpers."""
