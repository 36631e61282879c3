"""Runs `sarformer bench backbone` from a checkout: `python scripts/bench_backbone.py --batch 2`."""

import argparse
import sys

from sarformer_jax.benchmarks import backbone

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_backbone", description=backbone.__doc__.splitlines()[0])
    backbone.add_arguments(parser)
    sys.exit(backbone.run(parser.parse_args()))
