"""The arraybn command-line interface (installed as the package ``arraybn_cli``)."""
