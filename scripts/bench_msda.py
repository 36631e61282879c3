"""Thin wrapper: `python scripts/bench_msda.py ARGS` == `sarformer bench msda ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import msda

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_msda", description=msda.__doc__)
    msda.add_arguments(parser)
    sys.exit(msda.run(parser.parse_args()))
