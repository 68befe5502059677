"""Deterministic simulation of farmd's decision cores under faults (see ``core`` and ``faults``)."""
