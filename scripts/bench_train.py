"""Thin wrapper: `python scripts/bench_train.py ARGS` == `sarformer bench train ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import train

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_train", description=train.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(parser)
    sys.exit(train.run(parser.parse_args()))
