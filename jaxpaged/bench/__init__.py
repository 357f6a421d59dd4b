"""Benchmarks: `python -m jaxpaged.bench {throughput,latency,serve,kernel,startup}` (see __main__.py)."""
