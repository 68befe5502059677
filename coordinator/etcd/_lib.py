"""python-etcd3 and its generated protobuf modules, imported once, quietly.

``nlbfarm`` must be imported before etcd3: it selects the protobuf
implementation etcd3 0.12's generated modules work with. Being a submodule of
``nlbfarm``, this module is always imported after it.
"""
import warnings

import grpc._common as _grpc_common

with warnings.catch_warnings():
    # etcd3 0.12's generated protobuf modules use descriptor APIs that
    # protobuf >= 4 deprecates: hundreds of warnings, once, at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    import etcd3
    import etcd3.exceptions as etcd3_exc
    from etcd3 import etcdrpc
    from etcd3.etcdrpc import kv_pb2

# A thread blocked on a synchronous gRPC stream (the agent's watch) wakes every
# MAXIMUM_WAIT_TIMEOUT (0.1 s) only so that the main thread could take a
# KeyboardInterrupt; a cancel or an answer wakes it at once anyway. Measured
# on this project's bench machine: one idle watch stream costs 0.20 % of a
# core at 0.1 s and 0.13 % at 1 s, and the agent's idle budget is 0.3 %.
# farmd's main thread never blocks on a stream. Private to grpc: if a release
# drops the name, this only sets an unused attribute.
STREAM_WAIT_SLICE_S = 1.0
if hasattr(_grpc_common, "MAXIMUM_WAIT_TIMEOUT"):
    _grpc_common.MAXIMUM_WAIT_TIMEOUT = STREAM_WAIT_SLICE_S

__all__ = ["etcd3", "etcd3_exc", "etcdrpc", "kv_pb2"]
