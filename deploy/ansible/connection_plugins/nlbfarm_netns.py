# A connection plugin for lab hosts: each inventory host is a Linux network
# namespace on the controller machine. Every command of every task runs as
# `ip netns exec <namespace> /bin/sh -c ...`, so modules see the namespace's
# interfaces, addresses, nftables and listening sockets. The file system is the
# controller's own (a namespace isolates only the network), which is why lab
# inventories give every host its own directories (see the role's defaults).
from __future__ import annotations

import shlex

from ansible.plugins.connection.local import Connection as LocalConnection

DOCUMENTATION = """
    name: nlbfarm_netns
    short_description: run tasks inside a network namespace of the controller
    description:
        - Like the local connection, but every command runs under C(ip netns exec NAMESPACE).
        - Needs root on the controller (setns into a named namespace).
    options:
      netns:
        description: the namespace (as listed by C(ip netns list)); default the inventory host name
        vars:
          - name: ansible_netns
    extends_documentation_fragment:
        - connection_pipelining
"""


class Connection(LocalConnection):
    """Local execution, wrapped in `ip netns exec`."""

    transport = "nlbfarm_netns"

    def _netns(self) -> str:
        return self.get_option("netns") or self._play_context.remote_addr

    def exec_command(self, cmd, in_data=None, sudoable=True):
        if isinstance(cmd, bytes):
            cmd = cmd.decode()
        if not isinstance(cmd, str):
            cmd = " ".join(shlex.quote(c) for c in cmd)
        return super().exec_command(f"ip netns exec {shlex.quote(self._netns())} {cmd}",
                                    in_data=in_data, sudoable=sudoable)
