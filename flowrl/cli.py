"""The `flowrl` command line: list, train, data generate, plot.

    flowrl list
    flowrl train CONFIG.gin... [--bind 'X.y=v']... [--seed S | --seeds S,S,...] [--out DIR] [--resume | --overwrite]
                 [--online-steps N] [--online-only]
    flowrl data generate DOMAIN [--episodes N] [--workers W] [--dir D] [--seed S]
    flowrl plot RUN... [--out FILE] [--no-paper]

User errors (bad config, data, run directory) print one line `flowrl: error: …` and exit with 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tokenize
from pathlib import Path

from flowrl.errors import ConfigError, FlowRLError

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
# Arguments `_train` passes to `flowrl.train.train` itself (gin need not bind them).
TRAIN_CALL_ARGS = ("run_dir", "seed", "resume", "overwrite", "config_text", "progress", "dry_run")


def _import_extractors() -> None:
    """Register every installed strategy package (entry-point group `flowrl.extractors`)."""
    from flowrl.registry import load_extractor_plugins

    load_extractor_plugins()


def _list(args: argparse.Namespace) -> int:
    _import_extractors()
    from flowrl.registry import registered_names

    for name in registered_names():
        print(name)
    return 0


def parse_gin(config_files: list[str], bindings: list[str]) -> str:
    """Parse gin files and bindings strictly; return the parsed config text (for the fingerprint).

    Unknown names, malformed bindings, values of the wrong type (`flowrl.gin_check`) and missing
    files raise `ConfigError` naming the file and line, or the binding; required values left
    unbound (`gin.REQUIRED`) raise one `ConfigError` naming them all.
    """
    import gin

    from flowrl.gin_check import check_required, checking_types

    _import_extractors()
    import flowrl.train  # noqa: F401  (registers the `train` root)

    gin.add_config_file_search_path(str(EXPERIMENTS_DIR))
    # gin probes each include on the Python path first and logs a spurious ERROR when it is not
    # there (gin/resource_reader.py); the include is then found on the search path.
    logging.getLogger().addFilter(_quiet_gin_probe)
    for path in config_files:
        if not Path(path).is_file() and not (EXPERIMENTS_DIR / path).is_file():
            raise ConfigError(f"gin file {path} not found (relative paths resolve against the working "
                              f"directory, then {EXPERIMENTS_DIR})")
    resolved = [p if Path(p).is_file() else str(EXPERIMENTS_DIR / p) for p in config_files]
    with checking_types():  # a value of the wrong type fails here, with its file and line
        for path in resolved:
            try:
                gin.parse_config_file(path, skip_unknown=False)
            except (ValueError, KeyError, ImportError, SyntaxError, TypeError, OSError) as e:
                raise ConfigError(f"{path}: {_one_line(e)}") from None
            except tokenize.TokenError as e:
                raise ConfigError(f"{path}: {_token_error(e)}") from None
        for binding in bindings:
            try:
                gin.parse_config(binding, skip_unknown=False)
            except (ValueError, KeyError, ImportError, SyntaxError, TypeError, OSError) as e:
                raise ConfigError(f"--bind {binding!r}: {_one_line(e)}") from None
            except tokenize.TokenError as e:
                raise ConfigError(f"--bind {binding!r}: {_token_error(e)}") from None
    sources = ", ".join([*config_files, *(f"--bind {b!r}" for b in bindings)])
    check_required("flowrl.train", provided=TRAIN_CALL_ARGS, sources=sources or "no config")
    from flowrl.integrate import current_integrator

    # Read once now: a bad backend fails before any work, and the choice (read again when the
    # training step is traced) appears in the run's operative config.gin.
    current_integrator()
    return gin.config_str()


def _token_error(error: tokenize.TokenError) -> str:
    """Python's tokenizer (used by gin's parser) stops at the end of the text inside a bracket."""
    message, (line, _) = error.args
    return f"{message} at line {line}: a bracket or triple quote opened above is never closed"


def _quiet_gin_probe(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found")


def _one_line(error: BaseException) -> str:
    text = str(error).split("\n  In call to configurable")[0]  # gin's appended call trail
    text = " ".join(text.split())
    return text or type(error).__name__


def _default_out(config_files: list[str], seed: int) -> Path:
    stem = "-".join(Path(p).with_suffix("").name for p in config_files) or "run"
    return Path("runs") / f"{stem}-seed{seed}"


def parse_seeds(text: str) -> list[int]:
    """'0,1,2,3' or '0-3' → [0, 1, 2, 3] (distinct non-negative integers)."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            seeds.extend(range(int(low), int(high) + 1) if high else [int(low)])
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers or ranges, e.g. 0,1,2,3 or 0-3") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r}: seeds must be distinct non-negative integers")
    return seeds


def seed_run_dirs(out: str | None, config_files: list[str], seeds: list[int]) -> list[Path]:
    """One run directory per seed: `--out` itself for one seed; for several, `--out` with `{seed}`
    filled in, else `<out>/seed<S>`; by default runs/<configs>-seed<S> as single-seed runs."""
    if out is None:
        return [_default_out(config_files, s) for s in seeds]
    if "{seed}" in out:
        return [Path(out.replace("{seed}", str(s))) for s in seeds]
    if len(seeds) == 1:
        return [Path(out)]
    return [Path(out) / f"seed{s}" for s in seeds]


def online_bindings(args: argparse.Namespace) -> list[str]:
    """`--online-steps N` → `train.online_steps=N`; `--online-only` → `train.offline_steps=0` (after --bind)."""
    bindings = []
    if args.online_steps is not None:
        if args.online_steps < 0:
            raise ConfigError(f"--online-steps must be >= 0, got {args.online_steps}")
        bindings.append(f"train.online_steps={args.online_steps}")
    if args.online_only:
        bindings.append("train.offline_steps=0")
    return bindings


def _train(args: argparse.Namespace) -> int:
    import gin

    if args.seeds is not None and args.seed is not None:
        raise ConfigError("pass either --seed or --seeds, not both")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed or 0]
    config_text = parse_gin(args.configs, [*args.bind, *online_bindings(args)])
    if args.resume and args.overwrite:
        raise ConfigError("pass either --resume or --overwrite, not both")
    outs = seed_run_dirs(args.out, args.configs, seeds)
    from flowrl.train import train

    try:
        if len(seeds) == 1:
            summaries = [train(outs[0], seed=seeds[0], resume=args.resume, overwrite=args.overwrite,
                               config_text=config_text, progress=not args.no_progress, dry_run=args.dry_run)]
        else:
            summaries = train(outs, seed=seeds, resume=args.resume, overwrite=args.overwrite,
                              config_text=config_text, progress=not args.no_progress, dry_run=args.dry_run)
        if args.dry_run:
            print(gin.operative_config_str())
            return 0
    except (ValueError, TypeError) as e:
        if "gin" in str(e).lower() or "REQUIRED" in str(e):
            raise ConfigError(_one_line(e)) from None
        raise
    finally:
        gin.clear_config()
    for summary in summaries:
        _print_summary(summary, header=len(summaries) > 1)
    return 0


def _print_summary(summary: dict, *, header: bool) -> None:
    run = Path(summary["run_dir"])
    plot_path = None
    if summary.get("success") is not None:
        try:
            from flowrl.plot import plot_runs

            plot_path = plot_runs([run], run / "success.png")
        except FlowRLError as e:  # a plot must never fail a finished run
            print(f"flowrl: warning: no plot: {e}", file=sys.stderr)
    if header:
        print(f"seed {summary['seed']}")
    print(f"run directory : {run}")
    print(f"train metrics : {summary['train_csv']}")
    print(f"eval metrics  : {summary['eval_csv']}")
    print(f"checkpoints   : {summary['checkpoint_dir']}")
    if plot_path is not None:
        print(f"success plot  : {plot_path}")
    if summary.get("success") is not None:
        print(f"final success : {summary['success']:.3f} at step {summary['final_step']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowrl", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="print the registered extractors, one per line")
    listing.set_defaults(func=_list)

    train = commands.add_parser("train", help="train offline (then online) from gin configs")
    train.add_argument("configs", nargs="+", metavar="CONFIG.gin",
                       help="gin files (paths, or relative to the experiments/ directory)")
    train.add_argument("--bind", action="append", default=[], metavar="'X.y=v'",
                       help="extra gin binding (repeatable), applied after the files")
    train.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    train.add_argument("--seeds", metavar="S,S,...",
                       help="train several seeds in one process (e.g. 0,1,2,3 or 0-3), one run directory each")
    train.add_argument("--out", help="run directory (default: runs/<configs>-seed<S>); with --seeds, "
                                     "a path containing {seed}, or a parent holding seed<S>/ per seed")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="move an existing different run in --out aside (renamed, never deleted)")
    train.add_argument("--online-steps", type=int, default=None, metavar="N",
                       help="after the offline phase, fine-tune online for N env steps (binds train.online_steps)")
    train.add_argument("--online-only", action="store_true",
                       help="skip the offline phase (binds train.offline_steps=0), e.g. for RLPD")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--dry-run", action="store_true",
                       help="build and check the configuration, print the operative config, run nothing")
    train.set_defaults(func=_train)

    from flowrl.ogbench.commands import register_cli as register_data
    from flowrl.plot import register_cli as register_plot

    from flowrl.bench import register_cli as register_bench

    register_data(commands)
    register_plot(commands)
    register_bench(commands)
    from flowrl.report import register_cli as register_report
    from flowrl.sweep import register_cli as register_sweep

    register_sweep(commands)
    register_report(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported (OGBENCH-DATA.md §7)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FlowRLError as e:
        print(f"flowrl: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowrl: interrupted; rerun with --resume to continue from the latest checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
