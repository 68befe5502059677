"""nlbfarm: network load balancing without a load balancer."""
import os

# python-etcd3 0.12 ships protobuf code generated before protoc 3.19; modern
# protobuf runtimes only load it through the pure-Python implementation. This
# must be decided before google.protobuf is first imported, and every entry
# point imports this package first.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

__version__ = "0.1.0"
