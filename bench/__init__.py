"""Benchmarks that are run by hand (``python -m bench.<name>``), not by the test suite or the pipeline.

- ``bench.generate``: sampling tokens/s with and without the KV cache (``--write`` appends to reports/bench.md).
"""
