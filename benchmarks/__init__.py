"""Benchmarks: scripts that print a table with ratios against a baseline measured in the same run."""
