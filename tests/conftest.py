"""Session-wide settings: the tests' own cluster and Ceph state and ports (tests/testenv.py),
exported before any test module is imported."""
from __future__ import annotations

from . import testenv

testenv.apply()
