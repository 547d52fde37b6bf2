"""The ``vlp`` console script. User errors print one line on stderr and exit with code 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vlp.cli.arguments import add_overwrite, existing_path
from vlp.errors import UserError
from vlp.runtime import tune_allocator

__all__ = ["main", "build_parser"]

Handler = Callable[[argparse.Namespace], int]


def cmd_pretrain(args: argparse.Namespace) -> int:
    from vlp.config import load_config

    # config errors come before the heavy imports
    config = load_config(existing_path(args.config, "file"), args.set)
    from vlp.train.loop import pretrain

    run_dir = pretrain(config, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite)
    print(run_dir)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from vlp.data.synthetic import write_synthetic

    if args.train_size < 0 or args.test_size <= 0:
        raise UserError(f"--train-size/--test-size must be positive, got {args.train_size}/{args.test_size}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out: not a directory: {args.out}")
    if Path(args.out).is_dir() and any(Path(args.out).iterdir()) and not args.force:
        raise UserError(f"--out: {args.out} is not empty (files of the same name would be replaced); "
                        "use --force to write into it anyway")
    paths = write_synthetic(Path(args.out), train_size=args.train_size, test_size=args.test_size,
                            seed=args.seed, image_size=args.image_size, repeated_captions=args.repeated_captions)
    if args.benchmarks:
        from vlp.data.synthetic_benchmarks import write_synthetic_benchmarks

        paths.update(write_synthetic_benchmarks(Path(args.out), test_size=args.test_size, seed=args.seed,
                                                image_size=args.image_size))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


class Parser(argparse.ArgumentParser):
    """Argument errors become one line and exit code 2, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error instead of one line (default: off)")


def build_parser() -> argparse.ArgumentParser:
    from vlp.cli.eval_commands import add_eval_commands, add_finetune_commands
    from vlp.cli.extra_commands import add_extra_commands

    parser = Parser(prog="vlp", description="Vision-language pretraining.")
    add_common(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain from a YAML config")
    p.add_argument("config", metavar="CONFIG", help="the run's YAML config (every key: docs/configs.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 (repeatable; default: none)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in the run directory (default: off)")
    add_overwrite(p)
    add_common(p)
    p.set_defaults(handler=cmd_pretrain)

    add_finetune_commands(sub, add_common)
    add_eval_commands(sub, add_common)
    add_extra_commands(sub, add_common)
    from vlp.cli.benchmark import add_benchmark_command

    add_benchmark_command(sub, add_common)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("synth", help="write the built-in synthetic dataset to a directory")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="directory for the images and the JSON/JSONL files (required)")
    s.add_argument("--train-size", type=int, default=20000, metavar="N",
                   help="training images, five captions each (default: %(default)s)")
    s.add_argument("--test-size", type=int, default=1000, metavar="N",
                   help="test images for retrieval, VQA and zero-shot (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of the scene generator (default: %(default)s)")
    s.add_argument("--image-size", type=int, default=64, metavar="PX",
                   help="side of the square PNG images in pixels (default: %(default)s)")
    s.add_argument("--repeated-captions", type=float, default=0.0, metavar="P",
                   help="fraction of training images captioned only by a class-level caption that repeats across "
                        "images ('a red circle', 'two shapes'), as web alt-texts do (default: %(default)s)")
    s.add_argument("--force", action="store_true",
                   help="write into a non-empty --out directory, replacing files of the same name (default: off)")
    s.add_argument("--benchmarks", action="store_true",
                   help="also write benchmark files from the test scenes: SugarCrepe-format swapped colors and "
                        "positions, zero-shot image folders by color and shape (default: off)")
    add_common(s)
    s.set_defaults(handler=cmd_data_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tune_allocator()
    try:
        args = build_parser().parse_args(argv)
        handler: Handler = args.handler
        return handler(args)
    except UserError as exc:
        if debug:
            raise
        # a stopped run (signal, dead data worker) carries its own exit code: 128 + signal, or 1
        code = int(getattr(exc, "exit_code", 2))
        print(f"vlp: {'error' if code == 2 else 'stopped'}: {' '.join(str(exc).split())}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("vlp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
