"""Helpers shared by the lab tests that start labs of their own."""
from __future__ import annotations

import contextlib
from pathlib import Path

from nlbfarm.lab import Lab


@contextlib.contextmanager
def fresh_labs(prefix: str, state_root: Path):
    """``make(nodes=3, **lab_options)`` starts a lab of its own, one per call; all are
    torn down at the end, whatever happened, keeping their logs for a post-mortem.
    A lab that leaves a namespace behind fails the test that made it."""
    labs = []

    def make(nodes: int = 3, **kw) -> Lab:
        lab = Lab(prefix=prefix, state_root=state_root, **kw)
        labs.append(lab)
        lab.up(nodes=nodes, wait=60)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.down(keep_logs=True)
        left = [ns for lab in labs for ns in lab.lab_namespaces()]
        assert not left, f"labs {prefix} left namespaces behind: {left}"
