"""Dispatch policies. Importing this package registers every built-in policy in ``POLICIES``.

To add your own, see ``example.py`` (a small policy, how to register it and how to name it live).
"""

from . import baselines, disco, oracle  # noqa: E402,F401,I001 - registration side effect
from .base import POLICIES, Policy, PolicyConfig, make_policy

__all__ = ["POLICIES", "Policy", "PolicyConfig", "make_policy"]
