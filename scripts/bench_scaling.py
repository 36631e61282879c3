"""Thin wrapper: `python scripts/bench_scaling.py ARGS` == `sarformer bench scaling ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import scaling

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_scaling", description=scaling.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    scaling.add_arguments(parser)
    sys.exit(scaling.run(parser.parse_args()))
