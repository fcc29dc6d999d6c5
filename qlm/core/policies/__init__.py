"""Scheduling policies chosen by name: qlm, fcfs, edf, shepherd, priority, static, vllm-swap."""

from __future__ import annotations

import importlib

from qlm.core.policies.base import Policy, PolicyContext, make_policy, policy_names, register

BUILTIN_MODULES = ("fcfs", "edf", "priority", "static", "vllm_swap", "shepherd", "qlm")


def load_builtin_policies() -> None:
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(f"qlm.core.policies.{module}")
        except ModuleNotFoundError as exc:  # a policy not written yet must not break the others
            if exc.name != f"qlm.core.policies.{module}":
                raise


__all__ = ["Policy", "PolicyContext", "make_policy", "policy_names", "register"]
