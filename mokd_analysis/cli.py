"""`mokd analyze ...`."""

import click


@click.group("analyze")
def analyze_cli():
    """Analyse checkpoints: mean attention distance, prediction consistency, t-SNE."""
