"""Prometheus metrics of one agent, served at http://<metrics.listen>/metrics.

Gauges are read from the agent when Prometheus scrapes (a custom collector),
so they can never disagree with ``farmctl status``; the two histograms are
observed by the reconcile loop as things happen. nft counters are the kernel's
own, made monotonic across rule replacements by the data plane.

Every metric is per node; no secret (token, etcd credentials) is exported.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from nlbfarm.errors import ConfigError, DataPlaneError

log = logging.getLogger(__name__)

MEMBER_STATES = ("starting", "active", "failed", "draining", "leaving", "stopped")
CHECK_STATES = ("unknown", "passing", "failing")
ETCD_STATES = ("connecting", "connected", "retrying", "unreachable_all", "unreachable_self")
# Applies take milliseconds; handovers take up to a few keepalive intervals.
APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CHANGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


def etcd_state_label(text: str) -> str:
    """The agent's etcd sentence folded into a small label set."""
    if text.startswith("unreachable for every peer"):
        return "unreachable_all"
    if text.startswith("unreachable"):
        return "unreachable_self"
    return text if text in ETCD_STATES else "retrying"


class AgentCollector:
    def __init__(self, agent):
        self.agent = agent

    def describe(self):
        return []  # collected on demand only; nothing to check at registration

    def collect(self):
        a = self.agent
        view = a.node_view(with_counters=False)
        snap = a.cache.snapshot()
        labels = {"node": a.me, "cluster": a.cfg.cluster.name}

        info = InfoMetricFamily("nlbfarm_agent", "Agent version and identity")
        info.add_metric([], {**labels, "version": view["version"], "module": view["module"]})
        yield info

        members = GaugeMetricFamily("nlbfarm_members", "Members of the farm by state, as this node sees them",
                                    labels=["state"])
        by_state = {s: 0 for s in MEMBER_STATES}
        for m in snap.members.values():
            by_state[m.state] = by_state.get(m.state, 0) + 1
        for s, n in sorted(by_state.items()):
            members.add_metric([s], n)
        yield members

        own = GaugeMetricFamily("nlbfarm_node_state", "1 for this node's current state", labels=["state"])
        for s in MEMBER_STATES:
            own.add_metric([s], 1.0 if view["state"] == s else 0.0)
        yield own

        for name, doc, key in (
                ("nlbfarm_table_generation", "Generation of the bucket table in etcd", "generation"),
                ("nlbfarm_applied_generation", "Table generation this node applied", "applied_generation"),
                ("nlbfarm_owned_buckets", "Buckets the table gives this node", "owned_buckets"),
                ("nlbfarm_accepting_buckets", "Buckets the kernel accepts new connections for",
                 "accepting_buckets"),
                ("nlbfarm_draining_buckets", "Released buckets still serving old connections",
                 "draining_buckets"),
                ("nlbfarm_draining_connections", "Connections still served in draining buckets",
                 "draining_connections"),
                ("nlbfarm_etcd_last_keepalive_age_seconds", "Seconds since the last successful lease refresh",
                 "last_keepalive_age_s"),
                ("nlbfarm_module_restarts_in_window", "Farm module restarts in the current restart window",
                 "restarts_in_window")):
            yield GaugeMetricFamily(name, doc, value=float(view[key]))
        yield GaugeMetricFamily("nlbfarm_fence_open", "1 while the kernel fence lets VIP traffic in",
                                value=1.0 if view["fence_open"] else 0.0)

        etcd = GaugeMetricFamily("nlbfarm_etcd_session", "1 for the etcd session state", labels=["state"])
        current = etcd_state_label(view["etcd_state"])
        for s in ETCD_STATES:
            etcd.add_metric([s], 1.0 if s == current else 0.0)
        yield etcd

        up = GaugeMetricFamily("nlbfarm_check_up", "1 while a health check is passing",
                               labels=["check", "type"])
        state = GaugeMetricFamily("nlbfarm_check_state", "1 for each check's state", labels=["check", "state"])
        flips = CounterMetricFamily("nlbfarm_check_transitions", "State changes of a health check",
                                    labels=["check"])
        for c in view["checks"]:
            up.add_metric([c["name"], c["type"]], 1.0 if c["state"] == "passing" else 0.0)
            for s in CHECK_STATES:
                state.add_metric([c["name"], s], 1.0 if c["state"] == s else 0.0)
            flips.add_metric([c["name"]], c["transitions"])
        yield up
        yield state
        yield flips

        packets = CounterMetricFamily("nlbfarm_packets", "VIP packets by nft rule (kernel counters)",
                                      labels=["vip", "rule"])
        octets = CounterMetricFamily("nlbfarm_bytes", "VIP bytes by nft rule (kernel counters)",
                                     labels=["vip", "rule"])
        try:
            for c in a.dp.counters():
                packets.add_metric([c.vip, c.rule], c.packets)
                octets.add_metric([c.vip, c.rule], c.bytes)
        except DataPlaneError as exc:
            log.warning("metrics: cannot read nft counters reason=%s", exc)
        yield packets
        yield octets


class AgentMetrics:
    """The registry of one agent: its collector plus the loop's histograms."""

    def __init__(self, agent=None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.apply_seconds = Histogram(
            "nlbfarm_apply_duration_seconds", "Time to send one ruleset to the kernel (one nft transaction)",
            buckets=APPLY_BUCKETS, registry=self.registry)
        self.change_to_apply_seconds = Histogram(
            "nlbfarm_membership_change_to_apply_seconds",
            "From this node seeing a membership change to its kernel applying the resulting table",
            buckets=CHANGE_BUCKETS, registry=self.registry)
        if agent is not None:
            self.registry.register(AgentCollector(agent))
        self._server = None

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        try:
            self._server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics.listen: cannot bind {listen}: {exc.strerror}") from None

    @property
    def port(self) -> int | None:
        return self._server.server_port if self._server else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
