"""The `dsv4` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys

from cluster.bench import BenchError
from cluster.cli import bench as cmd_bench
from cluster.cli import chat as cmd_chat
from cluster.cli import deploy as cmd_deploy
from cluster.cli import model as cmd_model
from cluster.cli import ops as cmd_ops
from cluster.cli import serve as cmd_serve
from workers.config import ModelConfigError
from workers.errors import CheckpointError

# Errors that come from the user's input: print the message, no traceback, exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (
    cmd_model.UsageError,
    BenchError,
    CheckpointError,
    ModelConfigError,
    *cmd_serve.USER_ERRORS,
    *cmd_deploy.USER_ERRORS,
    *cmd_ops.USER_ERRORS,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv4",
        description="DeepSeek-V4 serving stack: models, checkpoints, serving and benchmarks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cmd_model.add_parsers(sub)
    cmd_serve.add_parsers(sub)
    cmd_chat.add_parser(sub)
    cmd_bench.add_parsers(sub)
    cmd_deploy.add_parsers(sub)
    cmd_ops.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


