"""Benchmarks behind `sarformer bench NAME` (each module: add_arguments(parser), run(args))."""
