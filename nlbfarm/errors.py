"""The small exception tree every layer raises into.

Callers catch FarmError at the edges (CLI, agent main loop) and print the
message: each message names the thing that was wrong.
"""


class FarmError(Exception):
    """Base of every error nlbfarm raises on purpose."""


class ConfigError(FarmError):
    """A config file, CLI argument or etcd value is invalid. Nothing was applied."""


class StoreError(FarmError):
    """The coordination store (etcd) failed or is unreachable."""


class StoreUnavailable(StoreError):
    """etcd could not be reached within the retry deadline."""


class DuplicateMember(StoreError):
    """Another live node already holds this node id."""


class DataPlaneError(FarmError):
    """nftables refused a transaction; the previous ruleset is still in force."""


class NetError(FarmError):
    """A netlink operation failed (address, link, namespace)."""


class NotFound(NetError):
    """The link, address or namespace does not exist."""


class AgentUnreachable(FarmError):
    """Nothing answered at the agent's address (farmctl's exit code 4)."""


class LabError(FarmError):
    """The one-machine lab could not be brought up or down."""


class PkiError(FarmError):
    """openssl could not make a throwaway key or certificate (nlbfarm.pki: lab and tests)."""
