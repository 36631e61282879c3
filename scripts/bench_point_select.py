"""Thin wrapper: `python scripts/bench_point_select.py ARGS` == `sarformer bench point_select ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import point_select

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_point_select", description=point_select.__doc__)
    point_select.add_arguments(parser)
    sys.exit(point_select.run(parser.parse_args()))
