import click


@click.group()
def cli():
    """arraybn: train, post-process and test networks with Batch Normalization."""
