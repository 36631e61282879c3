"""Thin wrapper: `python scripts/bench_gelu.py ARGS` == `sarformer bench gelu ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import gelu

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_gelu", description=gelu.__doc__)
    gelu.add_arguments(parser)
    sys.exit(gelu.run(parser.parse_args()))
