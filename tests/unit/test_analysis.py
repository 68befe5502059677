"""Matching the nodes' accept logs and the captured SYNs to the client's connection records."""
from nlbfarm.analysis import Accept, match_accepts, match_syns


def rec(t, port, ms, node="n1"):
    return {"t": t, "port": port, "node": node, "error": None, "ms": ms}


def test_each_accept_goes_to_the_attempt_that_covers_it():
    results = [rec(10.0, 5000, 1.0), rec(20.0, 5000, 1.0)]
    accepts = [Accept(10.0005, "c", 5000, "n1"), Accept(20.0005, "c", 5000, "n2")]
    assert match_accepts(results, accepts) == [["n1"], ["n2"]]


def test_regression_port_reused_by_an_attempt_that_read_its_clock_before_the_first_ended():
    # From a lab run: two workers, one port. The second read its start time
    # while the first still held the port, bound the port after it was freed,
    # and was accepted 0.5 ms after the first. Both accepts fell in both spans;
    # the old matcher gave both to the later start and none to the first.
    first = rec(1670.8450584, 58461, 0.57, "n2")
    second = rec(1670.8451500, 58461, 1.20, "n2")
    accepts = [Accept(1670.845285, "c", 58461, "n2"), Accept(1670.845789, "c", 58461, "n2")]
    assert match_accepts([first, second], accepts) == [["n2"], ["n2"]]


def test_regression_port_reused_while_the_first_attempts_span_still_covers_the_second_accept():
    # From a CI run (test_link_cut): the first attempt took 1.22 ms, the client's
    # kernel gave its port to the next one 1.0 ms after it started, and that one
    # was accepted 0.7 ms later, inside both spans. The old matcher gave both
    # accepts to the first attempt (the earlier end) and reported a double accept.
    first = rec(1796411275.5304768, 47797, 1.22)
    second = rec(1796411275.5314996, 47797, 0.92)
    accepts = [Accept(1796411275.53087, "c", 47797, "n1"), Accept(1796411275.531621, "c", 47797, "n1")]
    assert match_accepts([first, second], accepts) == [["n1"], ["n1"]]


def test_two_accepts_inside_one_attempt_that_nothing_else_covers_are_both_reported():
    results = [rec(10.0, 5000, 5.0)]
    accepts = [Accept(10.001, "c", 5000, "n1"), Accept(10.002, "c", 5000, "n2")]
    assert match_accepts(results, accepts) == [["n1", "n2"]]


def test_an_accept_outside_every_span_matches_nothing():
    results = [rec(10.0, 5000, 1.0)]
    assert match_accepts(results, [Accept(11.0, "c", 5000, "n1"), Accept(9.0, "c", 5000, "n1")]) == [[]]


def test_accept_within_rounding_slack_after_the_end_still_matches():
    results = [rec(10.0, 5000, 1.0)]
    assert match_accepts(results, [Accept(10.00101, "c", 5000, "n1")]) == [["n1"]]


def test_regression_stale_accept_from_a_slow_queue_is_not_charged_to_the_attempt_that_reused_the_port():
    # The first attempt timed out waiting for the application and closed; the
    # application accepted its connection from the queue only later, while a
    # second attempt (which had read its clock already) held the port. The old
    # matcher gave the second attempt both accepts: "accepted by ['n1', 'n1']".
    first = {"t": 100.0, "port": 33255, "node": None, "error": "TimeoutError", "ms": 3000.0}
    second = rec(102.9995, 33255, 2.0, "n1")
    accepts = [Accept(103.0002, "c", 33255, "n1", peer_gone=True), Accept(103.0010, "c", 33255, "n1")]
    assert match_accepts([first, second], accepts) == [["n1"], ["n1"]]


def test_stale_accept_on_another_node_still_counts_against_the_attempt_it_belongs_to():
    first = rec(10.0, 5000, 1.0, "n1")
    accepts = [Accept(10.0005, "c", 5000, "n1"), Accept(10.5, "c", 5000, "n2", peer_gone=True)]
    assert match_accepts([first], accepts) == [["n1", "n2"]]


def test_stale_accept_just_before_the_end_is_read_still_goes_to_the_attempt_that_closed():
    # The client's FIN can reach the node a few microseconds before the client
    # reads its end time; a next attempt on the port that ends inside the slack
    # must not take it.
    first = rec(10.0, 5000, 1.0)
    second = rec(10.0009, 5000, 0.5)
    accepts = [Accept(10.00099, "c", 5000, "n2", peer_gone=True)]
    assert match_accepts([first, second], accepts) == [["n2"], []]


def test_accept_log_lines_with_and_without_the_gone_field(tmp_path):
    from nlbfarm.analysis import read_accepts
    log = tmp_path / "n1.accept.log"
    log.write_text("1.5 10.0.0.1 5000\n2.5 10.0.0.1 5001 gone\n3.5 10.0.0.9 5002\n4.5 10.0.0.1 5003 junk x\n")
    got = read_accepts({"n1": log}, "10.0.0.1")
    assert [(a.port, a.peer_gone) for a in got] == [(5000, False), (5001, True)]


def test_regression_port_reused_within_two_milliseconds_each_syn_goes_to_its_own_attempt():
    # CI, test_regression_restart_with_live_old_lease_is_refused_then_joins: the
    # client's kernel gave port 34325 to the next attempt 1.6 ms after the first
    # began, inside the first attempt's span; both SYNs went to the first, and
    # the second attempt was reported as sending no SYN at all.
    results = [{"t": 912.4418566, "port": 34325, "node": "n2", "error": None, "ms": 2.01},
               {"t": 912.4434922, "port": 34325, "node": "n2", "error": None, "ms": 2.24}]
    syns = {("198.18.0.50", 34325, 111): [912.44190], ("198.18.0.50", 34325, 222): [912.44352]}
    assert match_syns(results, syns) == {0: [("198.18.0.50", 34325, 111)], 1: [("198.18.0.50", 34325, 222)]}


def test_a_retransmitted_syn_and_a_syn_outside_every_span():
    results = [{"t": 10.0, "port": 5000, "node": "n1", "error": None, "ms": 1500.0}]
    syns = {("c", 5000, 7): [10.001, 11.0], ("c", 5000, 8): [20.0]}
    assert match_syns(results, syns) == {0: [("c", 5000, 7)]}
