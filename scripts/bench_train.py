"""Thin wrapper: `python scripts/bench_train.py ARGS` == `sarformer bench train ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench_train", description=train.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(parser)
    sys.exit(train.run(parser.parse_args()))
