"""The ``asymcheck`` command: list, inspect, verify, export and clean up checkpoints.

One module per command (``ls``, ``inspect``, ``verify``, ``restore``, ``gc``); tier selection
in ``_tiers``, multi-rank shards in ``_ranks``, output helpers in ``_output``. Exit codes: 0 ok,
1 a verification fault, 2 a usage or user error (one line on stderr, no traceback), 130 when
interrupted, 141 when the reader of the output went away.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from tiers.base import TierError

from .. import __version__
from ..errors import AsymCheckError
from ..layout import MAX_STEP
from ._output import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USAGE
from ._tiers import TierSpec, tier_specs
from .gc import cmd_gc
from .inspect import cmd_inspect
from .ls import cmd_ls
from .restore import cmd_restore, export_pt, export_safetensors
from .verify import cmd_verify

__all__ = ["TierSpec", "build_parser", "export_pt", "export_safetensors", "log_to_stderr",
           "main", "tier_specs"]

_LOGGERS = ("asymcheck", "tiers")


def step_arg(value: str) -> int | None:
    """A step number, or ``latest`` (None)."""
    if value == "latest":
        return None
    try:
        step = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a step number or 'latest': {value!r}") from None
    if not 0 <= step < MAX_STEP:
        raise argparse.ArgumentTypeError(f"step must be in [0, 1e12), got {step}")
    return step


def count_arg(least: int) -> Callable[[str], int]:
    """An argument type: an integer >= ``least``."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = least - 1
        if n < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {value!r}")
        return n

    return parse


def common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--policy", dest="sub_policy", metavar="FILE",
                        help="tier policy file (TOML); default: host shm + ./checkpoints")
    common.add_argument("--tier", dest="sub_tiers", action="append", default=[],
                        metavar="URL|NAME", help="a tier URL (repeatable), or the name of a "
                        "policy tier; default: every tier of the policy")
    common.add_argument("--quiet", "-q", dest="sub_quiet", action="store_true",
                        help="no progress bars, warnings or summaries")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    p = argparse.ArgumentParser(prog="asymcheck", description="Inspect, verify, export and "
                                "clean up AsymCheck checkpoints.")
    p.add_argument("--version", action="version", version=f"asymcheck {__version__}")
    p.add_argument("--policy", metavar="FILE", help="tier policy file (TOML)")
    p.add_argument("--tier", dest="tiers", action="append", default=[], metavar="URL|NAME",
                   help="a tier URL (repeatable), or the name of a policy tier")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or warnings")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", parents=[common], help="list checkpoints per tier, newest first")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)

    ins = sub.add_parser("inspect", parents=[common], help="show one checkpoint's manifest")
    ins.add_argument("step", type=step_arg, metavar="STEP", help="step number or 'latest'")
    ins.add_argument("--rank", type=count_arg(0), metavar="R",
                     help="a multi-rank checkpoint: show rank R's shard manifest")
    ins.add_argument("--json", action="store_true", help="the whole manifest, checksums too")
    ins.set_defaults(func=cmd_inspect)

    ver = sub.add_parser("verify", parents=[common],
                         help="read and check every chunk (exit code 1 on any fault)")
    which = ver.add_mutually_exclusive_group()
    which.add_argument("step", type=step_arg, nargs="?", default=None, metavar="STEP",
                       help="step number or 'latest' (default: the newest committed)")
    which.add_argument("--all", action="store_true", help="every committed checkpoint")
    ver.add_argument("--json", action="store_true", help="machine-readable output")
    ver.set_defaults(func=cmd_verify)

    res = sub.add_parser("restore", parents=[common],
                         help="export a checkpoint to a .pt or .safetensors file, a "
                         "Hugging Face model folder, or a torch Distributed Checkpoint")
    res.add_argument("step", type=step_arg, metavar="STEP", help="step number or 'latest'")
    res.add_argument("--to", required=True, metavar="FILE",
                     help="FILE.pt (model + optimizers + step) or FILE.safetensors (model); "
                     "of a multi-rank checkpoint, rank 0's shard; with --format hf, dcp, "
                     "deepspeed or deepspeed-universal a folder")
    res.add_argument("--format", choices=("pt", "safetensors", "hf", "dcp", "deepspeed",
                                          "deepspeed-universal"), default=None,
                     help="pt | safetensors | hf (a from_pretrained folder: model.safetensors "
                     "+ config.json) | dcp (a torch.distributed.checkpoint folder: model + "
                     "optim + step) | deepspeed (DeepSpeed's own files of every rank, saved "
                     "through asymcheck.integrations.deepspeed) | deepspeed-universal (those "
                     "as a DeepSpeed universal checkpoint: any world size); default: from the "
                     "suffix of FILE")
    res.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    res.set_defaults(func=cmd_restore)

    gc = sub.add_parser("gc", parents=[common], help="apply retention now; remove stale shm")
    gc.add_argument("--keep", type=count_arg(1), metavar="N",
                    help="keep the N newest committed checkpoints per tier (default: policy)")
    gc.add_argument("--stale-shm", action="store_true",
                    help="also remove shared-memory checkpoints of dead jobs on this host")
    gc.add_argument("--dry-run", "-n", action="store_true", help="only print what would go")
    gc.set_defaults(func=cmd_gc)
    return p


@contextlib.contextmanager
def log_to_stderr(quiet: bool) -> Iterator[None]:
    """Library warnings as one line each on stderr, for the duration of one command."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.ERROR if quiet else logging.WARNING)
    handler.setFormatter(logging.Formatter("asymcheck: %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.quiet = args.quiet or args.sub_quiet
    if args.policy and args.sub_policy and args.policy != args.sub_policy:
        print("asymcheck: error: --policy given twice", file=sys.stderr)
        return EXIT_USAGE
    with log_to_stderr(args.quiet):
        try:
            args.specs = tier_specs(args.policy or args.sub_policy, args.tiers + args.sub_tiers)
            code: int = args.func(args)
            return code
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        except (AsymCheckError, TierError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            print(f"asymcheck: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("asymcheck: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
