"""The `sarformer` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
they are imported only when used, so `sarformer --help` is fast and needs no torch.  A subcommand
whose module is not built yet says so on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sarformer_jax.train", "train a model from a config (--config, --workdir)"),
    "eval": ("sarformer_jax.evaluate", "evaluate a checkpoint: mIoU table (whole / slide / aug-test)"),
    "predict": ("sarformer_jax.predict", "segment images and write label PNGs and colour overlays"),
    "convert": ("sarformer_jax.convert.cli", "convert PyTorch checkpoints (sam, beit, sarformer)"),
    "amg": ("sarformer_jax.sam.amg_cli", "SAM automatic masks for an image or a whole dataset"),
    "bench": ("sarformer_jax.bench", "GPU/CPU benchmarks (msda, backbone, sam, train, eval, data)"),
    "data": ("sarformer_jax.data.cli", "datasets: `data synth --out DIR` writes the synthetic set"),
}


class NotBuilt(Exception):
    pass


CACHED_COMMANDS = ("train", "eval", "predict", "amg")

# XLA flags the commands add unless the environment already sets them (SARFORMER_JAX_XLA_DEFAULTS=0:
# none).  On a GPU, while loops and conditionals then run inside CUDA-graph command buffers, so
# the Hungarian matcher's data-dependent loops no longer return to the host every iteration:
# measured on an H200 (docs/benchmarks.md), the SARFormer-B train step 103.6 -> 99.2 ms
# (blocking), 88.6 -> 84.9 ms (pipelined), gaps with no kernel running 632 -> 219 per step.
# Other backends ignore GPU flags.
DEFAULT_XLA_FLAGS = ("--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",)


def apply_default_xla_flags(environ=None) -> str:
    """Adds DEFAULT_XLA_FLAGS to `XLA_FLAGS` (before jax starts its backends), each unless a
    flag of that name is already there; returns the resulting value."""
    import os

    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if env.get("SARFORMER_JAX_XLA_DEFAULTS", "1") != "0":
        present = {f.split("=", 1)[0] for f in flags.split()}
        extra = [f for f in DEFAULT_XLA_FLAGS if f.split("=", 1)[0] not in present]
        flags = " ".join([flags] + extra).strip() if extra else flags
        if flags:
            env["XLA_FLAGS"] = flags
    return flags


def enable_compilation_cache() -> str | None:
    """Persistent XLA compilation cache for the commands that compile big programs (a SARFormer-B
    train step compiles for minutes on a GPU; a restarted run then loads it).  Directory from
    `SARFORMER_JAX_CACHE` (empty: off), default `~/.cache/sarformer_jax/xla`."""
    import os

    path = os.environ.get("SARFORMER_JAX_CACHE", os.path.expanduser("~/.cache/sarformer_jax/xla"))
    if not path:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    return path


def _load(name: str):
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            raise NotBuilt(name) from None
        raise
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        raise NotBuilt(name)
    return module


def build_parser(load_modules: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sarformer",
        description="SARFormer semantic segmentation in JAX: train, evaluate, predict, convert "
        "checkpoints, SAM automatic masks, benchmarks and datasets.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load_modules:
            _load(name).add_arguments(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    if command is not None:
        apply_default_xla_flags()
    try:
        parser = build_parser(load_modules=command)
    except NotBuilt as e:
        print(f"sarformer {e.args[0]}: not built yet in this version", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in CACHED_COMMANDS:
        enable_compilation_cache()
    return int(_load(args.command).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
