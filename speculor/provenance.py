"""Which source a measurement came from: the git commit of the checkout speculor runs from, and whether it had
uncommitted changes. Benchmark results record it next to the date, so every number quoted in the README or
benchmarks/RESULTS.md can be traced to the code that produced it."""

from __future__ import annotations

import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def _git(*arguments: str) -> str | None:
    try:
        done = subprocess.run(["git", *arguments], cwd=CHECKOUT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_revision() -> dict[str, str | bool | None]:
    """{"commit": full hash, "dirty": uncommitted changes to tracked files}; both None outside a git checkout (an
    installed wheel), so a result never claims a commit it cannot know."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def measurement_header(device: object, commit: str | None = None) -> dict:
    """What every benchmark's JSON starts with: the command line, the date (UTC), the commit (`commit` when given:
    a copy of the checkout whose git metadata is stale or missing, as on a lent GPU machine), whether the tree was
    dirty, the device's name and torch's version."""
    import datetime
    import shlex
    import sys

    import torch

    device = torch.device(device)
    revision = source_revision()
    return {
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or revision["commit"],
        "dirty": None if commit else revision["dirty"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
