"""`mokd export`: backbone weights in other frameworks' layouts (filled in by the detection work)."""

import click


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
def export_cmd(checkpoint):
    """Export a backbone from CHECKPOINT."""
    raise click.ClickException("export: not built yet")
