"""Runs `sarformer bench backbone` from a checkout: `python scripts/bench_backbone.py --batch 2`."""

import argparse
import sys

from sarformer_jax.benchmarks import backbone

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench_backbone", description=backbone.__doc__.splitlines()[0])
    backbone.add_arguments(parser)
    sys.exit(backbone.run(parser.parse_args()))
