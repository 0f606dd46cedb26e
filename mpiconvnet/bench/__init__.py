"""Benchmarks: `python -m mpiconvnet.bench NAME [options]`; each NAME is a module here."""
