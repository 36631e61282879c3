"""Thin wrapper: `python scripts/bench_matcher.py ARGS` == `sarformer bench matcher ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import matcher

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench_matcher", description=matcher.__doc__)
    matcher.add_arguments(parser)
    sys.exit(matcher.run(parser.parse_args()))
