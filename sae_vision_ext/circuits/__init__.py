"""Residual replacement model and (next) circuit tracing over SAE features of every layer."""
