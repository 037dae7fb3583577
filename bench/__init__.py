"""deepssim_fast benchmarks: tables of providers, timed side by side in one process (see harness.py)."""
