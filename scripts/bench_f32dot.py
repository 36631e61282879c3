"""Thin wrapper: `python scripts/bench_f32dot.py ARGS` == `sarformer bench f32dot ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import f32dot

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_f32dot", description=f32dot.__doc__)
    f32dot.add_arguments(parser)
    sys.exit(f32dot.run(parser.parse_args()))
