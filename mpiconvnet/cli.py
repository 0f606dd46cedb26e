"""The argument parser of the entry points other than train (whose flags config.py parses)."""
import argparse


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is one line, as every other error of the project
    is: argparse prints its whole usage block (5-10 lines) before the line that matters.
    Subcommands' parsers are of this class too (add_subparsers takes the parent's)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")
