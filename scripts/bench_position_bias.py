"""Thin wrapper: `python scripts/bench_position_bias.py ARGS` == `sarformer bench position_bias ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import position_bias

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_position_bias", description=position_bias.__doc__)
    position_bias.add_arguments(parser)
    sys.exit(position_bias.run(parser.parse_args()))
