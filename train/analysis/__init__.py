"""Measurements of compiled programs (HLO byte counts), for benchmarks and tests; not used by a run."""
