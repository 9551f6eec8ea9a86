"""Benchmark results record the commit they were measured at; check the helper reads it from this checkout."""

from __future__ import annotations

import re
import subprocess

from speculor.provenance import CHECKOUT, source_revision


def test_source_revision_is_this_checkouts_head_or_nothing():
    """The HEAD of the checkout speculor runs from, or None for both fields where it is not a git checkout."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True)
    revision = source_revision()
    if head.returncode != 0:
        assert revision == {"commit": None, "dirty": None}
        return
    assert revision["commit"] == head.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", revision["commit"])
    assert isinstance(revision["dirty"], bool)
