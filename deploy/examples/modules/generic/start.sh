#!/bin/sh
# Start the application; farmd runs this at start-up (and on restart) and
# waits for it up to module.command_timeout. Exit non-zero on failure.
set -e
exec systemctl start myapp
