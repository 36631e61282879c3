"""Thin wrapper: `python scripts/bench_attention.py ARGS` == `sarformer bench attention ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import attention

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_attention", description=attention.__doc__)
    attention.add_arguments(parser)
    sys.exit(attention.run(parser.parse_args()))
