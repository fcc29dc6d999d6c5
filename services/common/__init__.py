"""Plumbing every service shares: entry point, settings, gRPC error mapping, probes.

A service imports from here and from the library (``qlm``), never from another service.
"""
