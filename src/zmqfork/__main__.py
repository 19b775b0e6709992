"""``python -m zmqfork doctor [--json]`` and ``python -m zmqfork demo [--generations N] [--raw]``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zmqfork", description="Fork-safe ZeroMQ for Python.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{doctor,demo}")
    doctor = commands.add_parser(
        "doctor",
        help="versions, fork detection, descriptor tracking, and a live self-test (exit 0 if all pass)",
        description="Report versions, fork detection and descriptor tracking, then fork by os.fork(), libc "
        "fork() and the raw clone syscall and check detection, rebuild and descriptor cleanup in each child.",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    demo = commands.add_parser(
        "demo",
        help="the fork chain: each generation forks the next and exits",
        description="Each generation makes a context and a PUSH, sends, forks the next generation and exits; "
        "the first process counts messages and each generation's descriptors.",
    )
    from zmqfork._demo import DEFAULT_FD_LIMIT, DEFAULT_GENERATIONS

    demo.add_argument(
        "--generations", type=_positive, default=DEFAULT_GENERATIONS, metavar="N",
        help=f"length of the chain (default {DEFAULT_GENERATIONS})",
    )
    demo.add_argument("--raw", action="store_true", help="run the same chain on plain pyzmq, to see where it breaks")
    demo.add_argument(
        "--fd-limit", type=_positive, default=DEFAULT_FD_LIMIT, metavar="N",
        help=f"soft descriptor limit for the chain (default {DEFAULT_FD_LIMIT})",
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command named in ``argv`` (default: the command line); return the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        from zmqfork import _doctor

        return _doctor.main(as_json=args.json)
    from zmqfork import _demo

    return _demo.main(args.generations, args.raw, args.fd_limit)


if __name__ == "__main__":
    sys.exit(main())
