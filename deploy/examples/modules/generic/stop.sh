#!/bin/sh
# Stop the application; farmd runs this after handing over the node's
# buckets at shutdown, and for on_failure: restart or stop.
set -e
exec systemctl stop myapp
