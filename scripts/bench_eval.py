"""Thin wrapper: `python scripts/bench_eval.py ARGS` == `sarformer bench eval ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import eval as bench_eval

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_eval", description=bench_eval.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_eval.add_arguments(parser)
    sys.exit(bench_eval.run(parser.parse_args()))
