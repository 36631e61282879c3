"""Thin wrapper: `python scripts/bench_matcher.py ARGS` == `sarformer bench matcher ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import matcher

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_matcher", description=matcher.__doc__)
    matcher.add_arguments(parser)
    sys.exit(matcher.run(parser.parse_args()))
