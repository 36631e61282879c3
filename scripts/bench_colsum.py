"""Thin wrapper: `python scripts/bench_colsum.py ARGS` == `sarformer bench colsum ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import colsum

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_colsum", description=colsum.__doc__)
    colsum.add_arguments(parser)
    sys.exit(colsum.run(parser.parse_args()))
