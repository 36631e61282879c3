"""Thin wrapper: `python scripts/bench_sam_tokens.py ARGS` == `sarformer bench sam_tokens ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import sam_tokens

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_sam_tokens", description=sam_tokens.__doc__)
    sam_tokens.add_arguments(parser)
    sys.exit(sam_tokens.run(parser.parse_args()))
