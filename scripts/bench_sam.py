"""Runs `sarformer bench sam` from a checkout: python scripts/bench_sam.py [--models vit_b ...]."""

import argparse
import sys

from sarformer_jax.benchmarks import sam

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_sam", description=sam.__doc__.splitlines()[0])
    sam.add_arguments(parser)
    sys.exit(sam.run(parser.parse_args()))
