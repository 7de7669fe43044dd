"""Implementations of the ``selfforcing`` subcommands (registered in ``selfforcing/cli.py``)."""
