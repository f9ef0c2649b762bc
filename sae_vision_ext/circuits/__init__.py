"""Residual replacement model, attribution graphs over SAE features of every layer, their evaluation and debiasing."""
