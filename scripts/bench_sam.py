"""Runs `sarformer bench sam` from a checkout: python scripts/bench_sam.py [--models vit_b ...]."""

import argparse
import sys

from sarformer_jax.benchmarks import sam

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench_sam", description=sam.__doc__.splitlines()[0])
    sam.add_arguments(parser)
    sys.exit(sam.run(parser.parse_args()))
