"""The benchmark runner: one failing benchmark is reported, the others still run; the README block."""
import sys
import types

import pytest

from nlbfarm.bench.__main__ import run_all, summary_table, update_readme, write_report


def _fake(name, run):
    mod = types.ModuleType(f"nlbfarm.bench.{name}")
    mod.TITLE = f"Fake {name}"
    mod.run = run
    mod.plot = lambda result, outdir: []
    mod.report = lambda result, plots: f"figures of {name}\n"
    sys.modules[mod.__name__] = mod
    return mod


@pytest.fixture
def fakes():
    _fake("fake_ok", lambda progress, quick=False: {
        "params": {"n": 1}, "notes": [], "summary": [{"metric": "rate", "value": "0.98x", "compared_with": "baseline"}]})

    def broken(progress, quick=False):
        raise RuntimeError("haproxy: cannot bind")
    _fake("fake_broken", broken)
    yield
    for n in ("fake_ok", "fake_broken"):
        sys.modules.pop(f"nlbfarm.bench.{n}", None)


def test_a_failing_benchmark_is_reported_and_the_others_run(fakes, tmp_path):
    data = run_all(("fake_broken", "fake_ok"), quick=True, progress=lambda m: None)
    assert data["benchmarks"]["fake_broken"]["ok"] is False
    assert "haproxy: cannot bind" in data["benchmarks"]["fake_broken"]["error"]
    assert data["benchmarks"]["fake_ok"]["ok"] is True
    table = summary_table(data)
    assert "| Fake fake_ok | rate | 0.98x | baseline |" in table
    assert "failed: RuntimeError: haproxy: cannot bind" in table
    report = write_report(data, tmp_path).read_text()
    assert "figures of fake_ok" in report and "Failed in this run" in report


def test_readme_block_is_replaced_and_required(fakes, tmp_path):
    data = run_all(("fake_ok",), quick=True, progress=lambda m: None)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin -->\nold\n<!-- bench:end -->\noutro\n")
    update_readme(data, readme, tmp_path / "r.md")
    text = readme.read_text()
    assert "old" not in text and "| Fake fake_ok | rate | 0.98x | baseline |" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="bench:begin"):
        update_readme(data, readme, tmp_path / "r.md")


def test_an_only_run_replaces_just_its_own_rows(fakes, tmp_path):
    data = run_all(("fake_ok",), quick=True, progress=lambda m: None)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin -->\nMeasured 2026-01-01 by `make bench`; full report: [a](a).\n\n"
                      "| benchmark | metric | result | compared with |\n|---|---|---|---|\n"
                      "| Other | x | 1 | y |\n| Fake fake_ok | rate | 0.50x | baseline |\n<!-- bench:end -->\noutro\n")
    update_readme(data, readme, tmp_path / "r.md", only=True)
    text = readme.read_text()
    assert "| Other | x | 1 | y |" in text and "0.50x" not in text
    assert "| Fake fake_ok | rate | 0.98x | baseline |" in text
    assert "Measured 2026-01-01" in text and "Rows of Fake fake_ok: measured" in text
    assert text.count("| benchmark |") == 1 and text.endswith("outro\n")
