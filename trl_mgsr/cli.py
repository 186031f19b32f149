"""The `trl-mgsr` command (also `python -m trl_mgsr`).

    trl-mgsr distill ...   train a student with MGSR (TRL-style flags: ScriptArguments, MGSRConfig, ModelConfig)
    trl-mgsr eval ...      ROUGE-L evaluation, MiniLLM/DistiLLM protocol
    trl-mgsr demo ...      offline end-to-end demo: MGSR vs GKD on built-in data

User errors (a missing file, an unknown column, a bad flag, an invalid setting, a model whose values turn NaN/inf)
print one line,
`trl-mgsr <command>: error: ...`, to stderr and exit with status 2; set `TRL_MGSR_TRACEBACK=1` to see the traceback.
"""

from __future__ import annotations

import os
import sys

from .cli_errors import one_line

USAGE = """usage: trl-mgsr {distill,eval,demo} [options]

commands:
  distill   train a student with MGSR (TRL-style flags; see `trl-mgsr distill --help`)
  eval      ROUGE-L evaluation with the MiniLLM/DistiLLM protocol (`trl-mgsr eval --help`)
  demo      offline end-to-end demo: MGSR vs GKD on built-in data (`trl-mgsr demo --help`)
"""


def _demo(argv: list[str]) -> int:
    from .demo import main

    return main(argv)


def _eval(argv: list[str]) -> int:
    from .evaluation import main

    return main(argv)


def _distill(argv: list[str]) -> int:
    from .distill import main

    return main(argv)


COMMANDS = {"distill": _distill, "eval": _eval, "demo": _demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE, end="")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"trl-mgsr: error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        return COMMANDS[command](argv[1:])
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, already printed)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except (ValueError, OSError, ImportError, KeyError, FloatingPointError) as err:
        if os.environ.get("TRL_MGSR_TRACEBACK"):
            raise
        print(f"trl-mgsr {command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
