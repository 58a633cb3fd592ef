"""The ``matsciml`` command: argparse subcommands (:mod:`.app`), the LightningCLI ones (:mod:`.training`),
and the one-line reporting of input errors (:mod:`.errors`)."""

from matsciml.cli.app import main

__all__ = ["main"]
