"""`flowrl data …` subcommands (wired into `flowrl/cli.py` by `register_cli`).

    flowrl data generate DOMAIN [--episodes N] [--workers W] [--dir D] [--seed S]
                                [--max-episode-steps T] [--overwrite]

Default directory: `$FLOWRL_DATA_DIR`, else `~/.ogbench/data` (ogbench's own default). Exit codes:
0 done, 1 refused/failed (existing file, bad numbers), 2 unknown or non-generable domain.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flowrl.ogbench.domains import DatasetError, NotGenerableError, UnknownEnvError

__all__ = ["default_data_dir", "register_cli"]


def default_data_dir() -> Path:
    """`$FLOWRL_DATA_DIR` if set, else `~/.ogbench/data`."""
    return Path(os.environ.get("FLOWRL_DATA_DIR") or "~/.ogbench/data").expanduser()


def _generate(args: argparse.Namespace) -> int:
    from flowrl.ogbench.generate import generate_dataset

    directory = Path(args.dir).expanduser() if args.dir is not None else default_data_dir()
    try:
        result = generate_dataset(
            args.domain,
            episodes=args.episodes,
            workers=args.workers,
            directory=directory,
            seed=args.seed,
            max_episode_steps=args.max_episode_steps,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (UnknownEnvError, NotGenerableError) as error:
        print(f"flowrl data generate: error: {error}", file=sys.stderr)
        return 2
    except (DatasetError, ValueError) as error:
        print(f"flowrl data generate: error: {error}", file=sys.stderr)
        return 1
    print(
        f"wrote {result.train_path} ({result.train_episodes} episodes) and {result.val_path} "
        f"({result.val_episodes} episodes): {result.transitions} steps in {result.wall_seconds:.1f} s "
        f"= {result.transitions_per_second:.0f} steps/s with {result.workers} worker(s)"
    )
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command (with subcommand `generate`) to a top-level argparse subparsers object.

    Each leaf parser sets `func`, a handler taking the parsed Namespace and returning an exit code.
    """
    data = subparsers.add_parser("data", help="OGBench datasets: generate locally", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    data_commands = data.add_subparsers(dest="data_command", metavar="{generate}")
    data_commands.required = True

    generate = data_commands.add_parser(
        "generate",
        help="generate an OGBench manipulation 'play' dataset from ogbench's scripted oracles",
        description=(
            "Write <domain>-v0.npz and <domain>-v0-val.npz (OGBench format) with N train episodes and "
            "max(1, N//10) val episodes. Output depends only on the seed, not on --workers."
        ),
    )
    generate.add_argument("domain", help="cube-single, cube-double, cube-triple, cube-quadruple, scene, "
                                         "puzzle-3x3 or puzzle-4x4 (with or without -play)")
    generate.add_argument("--episodes", type=int, default=None,
                          help="train episodes (default: the official count: 1000; cube-triple 3000, "
                               "cube-quadruple 5000)")
    generate.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                          help="worker processes (default: all CPUs)")
    generate.add_argument("--dir", default=None,
                          help="output directory (default: $FLOWRL_DATA_DIR or ~/.ogbench/data)")
    generate.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    generate.add_argument("--max-episode-steps", type=int, default=1001,
                          help="rows per episode (default 1001 as in OGBench: 1000 transitions)")
    generate.add_argument("--overwrite", action="store_true", help="replace existing dataset files")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")
    generate.set_defaults(func=_generate)
