"""Load generators, experiment runners and benchmarks (not part of the installed core)."""
