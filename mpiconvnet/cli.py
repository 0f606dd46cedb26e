"""The argument parser of the entry points other than train (whose flags config.py parses)."""
import argparse
import sys

from mpiconvnet.distributed import first_rank_by_environment


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is one line, as every other error of the project
    is: argparse prints its whole usage block (5-10 lines) before the line that matters.
    Subcommands' parsers are of this class too (add_subparsers takes the parent's). Under
    mpiexec every rank sees the same bad flag: only the launcher's rank 0 says it."""

    def error(self, message):
        if first_rank_by_environment():
            print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
