"""Evaluation suites: ``python -m eval <suite> --data-dir ../shared/data --output FILE.json [--quick]``.

Every suite writes the measurement contract ``{"suite", "dataset", "config", "systems", "machine"}``.
Nothing in the project imports this package.
"""

from __future__ import annotations
