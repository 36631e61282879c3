"""Thin wrapper: `python scripts/bench_sam_post.py ARGS` == `sarformer bench sam_post ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import sam_post

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_sam_post", description=sam_post.__doc__)
    sam_post.add_arguments(parser)
    sys.exit(sam_post.run(parser.parse_args()))
