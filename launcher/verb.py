"""One CLI verb: its argparse spec, with a runnable example at the end of its --help, and
its handler. cli.py and control.py both add verbs through this, so each imports it downward."""

from __future__ import annotations

import argparse


def add_verb(sub, name: str, help: str, parents: list, example: str, handler) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with one runnable example, run by `handler`."""
    p = sub.add_parser(name, help=help, description=help, parents=parents,
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"example:\n  {example}")
    p.set_defaults(handler=handler)
    return p
