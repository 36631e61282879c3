"""Thin wrapper: `python scripts/bench_sam_upscale.py ARGS` == `sarformer bench sam_upscale ARGS`."""

import argparse
import sys

from sarformer_jax.benchmarks import sam_upscale

if __name__ == "__main__":
    from sarformer_jax.cli import apply_default_xla_flags

    apply_default_xla_flags()  # as the `sarformer` command does
    parser = argparse.ArgumentParser(prog="bench_sam_upscale", description=sam_upscale.__doc__)
    sam_upscale.add_arguments(parser)
    sys.exit(sam_upscale.run(parser.parse_args()))
