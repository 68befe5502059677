"""nlbfarm: network load balancing without a load balancer."""
import os

# python-etcd3 0.12 ships protobuf code generated before protoc 3.19; modern
# protobuf runtimes only load it through the pure-Python implementation. This
# must be decided before google.protobuf is first imported, and every entry
# point imports this package first.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
# gRPC's C core writes its own lines (a refused TLS handshake: "I1205 ... Handshake failed")
# straight to stderr, past Python's logging, so they would break farmd's logfmt. The
# failures that matter reach the code as errors and are logged there. GRPC_VERBOSITY=ERROR
# (or INFO) in the environment brings the core's lines back for debugging.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

__version__ = "0.1.0"
