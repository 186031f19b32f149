"""How the `trl-mgsr` commands report user errors: one line, exit status 2 (no usage dump, no traceback).

Used by every subcommand's parser (`demo`, `eval`, `distill`) and by `cli.main`; it imports nothing of the package,
so the dependencies run one way: commands -> cli_errors, cli -> commands.
"""

from __future__ import annotations

import argparse


class OneLineErrors:
    """argparse mixin: report a usage error as one line (no usage dump) and exit with status 2."""

    def error(self, message):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class OneLineErrorParser(OneLineErrors, argparse.ArgumentParser):
    pass


def one_line(err: BaseException) -> str:
    """An exception as one line of text (a missing file's name included)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text
