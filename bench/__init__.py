"""Benchmark harness: ``python -m bench.run`` measures the router, its ceiling and the status quo.

See ``bench/README.md`` for what is measured and how to read the ratios.
"""
