"""Thin wrapper: `python scripts/bench_resize.py ARGS` == `sarformer bench resize ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import resize

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_resize", description=resize.__doc__)
    resize.add_arguments(parser)
    sys.exit(resize.run(parser.parse_args()))
