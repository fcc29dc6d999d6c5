"""The pure scheduling core: data model, performance model, estimator, policies.

Nothing in this package performs I/O or reads a clock; time is always passed in.
"""
