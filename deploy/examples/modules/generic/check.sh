#!/bin/sh
# A custom check: exit 0 when this node can serve. The last output line is
# shown in `farmctl node` and in the node's state reason when it fails.
if [ -e /etc/nlbfarm/maintenance ]; then
  echo "maintenance flag /etc/nlbfarm/maintenance is set"
  exit 1
fi
exit 0
