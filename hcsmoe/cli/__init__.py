"""Command line: `hcsmoe compress`, `hcsmoe eval`, `hcsmoe inspect`."""

from __future__ import annotations

import argparse
import sys

from hcsmoe.errors import Interrupted, UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, pointing to --help, instead of a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from hcsmoe.cli import compress, evaluate, inspect

    parser = OneLineParser(
        prog="hcsmoe",
        description="Merge the experts of a sparse Mixture-of-Experts model by hierarchical clustering (HC-SMoE).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    compress.add_compress_parser(sub)
    evaluate.add_eval_parser(sub)
    inspect.add_inspect_parser(sub)
    return parser


def quiet_transformers() -> None:
    """Our own progress bars and messages replace transformers' loading chatter."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_transformers()
    parser = build_parser()
    args = parser.parse_args(argv)
    code = run(args)
    from hcsmoe.distributed import exit_now_if_left_a_job

    return exit_now_if_left_a_job(code)


def run(args: argparse.Namespace) -> int:
    """The command's exit code; a bad input or an interruption is one line on stderr."""
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        print(f"hcsmoe: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as interruption:
        print(f"hcsmoe: {interruption}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("hcsmoe: interrupted; nothing was written under the requested name", file=sys.stderr)
        return 130

