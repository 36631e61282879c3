"""Runs `sarformer bench data` from a checkout: python scripts/bench_data.py [--workers 2 ...]."""

import argparse
import sys

from sarformer_jax.benchmarks import data

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(description=data.__doc__.splitlines()[0])
    data.add_arguments(parser)
    sys.exit(data.run(parser.parse_args()))
