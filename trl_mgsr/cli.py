"""The `trl-mgsr` command (also `python -m trl_mgsr`)."""

from __future__ import annotations

import argparse
import sys


def _demo(argv: list[str]) -> int:
    from .demo import run_demo

    parser = argparse.ArgumentParser(prog="trl-mgsr demo", description="Offline end-to-end MGSR distillation demo.")
    parser.add_argument("--output_dir", default="mgsr-demo", help="Where the distilled student is saved.")
    parser.add_argument("--quick", action="store_true", help="A few steps only (smoke test).")
    args = parser.parse_args(argv)
    run_demo(args.output_dir, quick=args.quick)
    return 0


COMMANDS = {"demo": _demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"trl-mgsr: unknown command {argv[0]!r}; commands: {known}", file=sys.stderr)
            return 2
        print(f"usage: trl-mgsr {{{known}}} [options]")
        return 0
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
