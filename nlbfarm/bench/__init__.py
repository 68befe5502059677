"""Benchmarks: `make bench` runs every one of them and writes one report.

Each benchmark is a module of this package with:

* ``TITLE``: a heading for the report;
* ``run(progress, quick=False) -> dict``: measures and returns JSON-able
  results. ``progress(str)`` reports what it is doing. ``quick=True`` is a
  small, fast version for the test suite (it checks that the benchmark runs,
  never its timings). The dict has at least:
    - ``"params"``: what was measured and with which settings (trials, sizes,
      lease TTL...);
    - ``"summary"``: rows for the README's summary table, each
      ``{"benchmark": ..., "metric": ..., "value": ..., "compared_with": ...}``,
      where ``value`` is a short text that leads with a ratio against the
      baseline or peer measured in the same run;
    - ``"notes"``: list of sentences (peers that could not run and the error
      seen, caveats);
* ``report(result, plots) -> str``: the Markdown section (no top heading;
  the runner adds ``TITLE``); ``plots`` are the PNG file names ``plot`` wrote;
* ``plot(result, outdir) -> list[str]``: writes PNG plots (matplotlib) into
  ``outdir`` and returns their file names (may return []).

Machines here are noisy: benchmarks repeat trials and report medians and
ratios against a baseline or peer measured in the same run, never a single
absolute time. Every load they generate is bounded in count and time and
stays inside network namespaces they create (prefix ``bn``), which they
remove again, also after a failure; a leftover from a crashed run is removed
at the start of the next.
"""
from __future__ import annotations

# Run order: cheap and quiet ones first; the control-plane and failover runs last.
BENCHMARKS = ("table_quality", "rule_programming", "foreign_packets", "dataplane", "failover", "control_plane")
