"""Analyses of trained checkpoints: mean attention distance, prediction consistency, t-SNE."""
