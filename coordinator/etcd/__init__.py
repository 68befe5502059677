"""The store on etcd.

* :mod:`.client`: :class:`EtcdStore`, connections, TLS, authentication and the unary calls;
* :mod:`.watch`: prefix watches, each with its own thread and stream;
* :mod:`.retry`: which failures are retried, and the one retry policy;
* :mod:`.keys`: etcd's records as the store's, with bounded key decoding.
"""
from nlbfarm.coordinator.etcd._lib import etcd3
from nlbfarm.coordinator.etcd.client import EtcdStore
from nlbfarm.coordinator.etcd.retry import is_connection_error, retrying

__all__ = ["EtcdStore", "etcd3", "is_connection_error", "retrying"]
