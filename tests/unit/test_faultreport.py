"""The Faults-survived table renderer (make faults)."""
from nlbfarm.faultreport import render


def test_regression_a_trial_without_long_lived_connections_renders():
    # The certified kill -9 trial records no long-lived connections; make faults
    # stopped with KeyError 'broken' after every lab test had passed.
    out = render({"kill -9 of one agent, certified by its peers":
                  {"failed": 0, "new_connections": 1546, "recovery_s": 0.0, "measured": "2026-12-04"},
                  "LAN link of one node cut":
                  {"failed": 6, "new_connections": 6728, "broken": 61, "long_lived": 796, "broken_on_victim": 61,
                   "recovery_s": 3.1, "measured": "2026-12-04"}})
    assert "| kill -9 of one agent, certified by its peers | 0 of 1546 | - | 0.0 | 2026-12-04 |" in out
    assert "| LAN link of one node cut | 6 of 6728 | 61 of 796 (all on the failed node) | 3.1 | 2026-12-04 |" in out
