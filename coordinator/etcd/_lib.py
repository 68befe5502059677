"""python-etcd3 and its generated protobuf modules, imported once, quietly.

``nlbfarm`` must be imported before etcd3: it selects the protobuf
implementation etcd3 0.12's generated modules work with. Being a submodule of
``nlbfarm``, this module is always imported after it.
"""
import warnings

with warnings.catch_warnings():
    # etcd3 0.12's generated protobuf modules use descriptor APIs that
    # protobuf >= 4 deprecates: hundreds of warnings, once, at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import etcd3
    import etcd3.exceptions as etcd3_exc
    from etcd3 import etcdrpc
    from etcd3.etcdrpc import kv_pb2

__all__ = ["etcd3", "etcd3_exc", "etcdrpc", "kv_pb2"]
