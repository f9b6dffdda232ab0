"""The daemons: the milter, the socketmap policy server, the worker, and what runs them.

- ``milter``: the pymilter glue (gathers recipients and headers, applies ``core.verdict``);
- ``socketmap`` (with ``netstring``): Postfix's ``smtp_tls_policy_maps`` server;
- ``serve``: ``tlsmilter serve``, the milter on either backend, hosting the policy server
  on the embedded one;
- ``policy_server``: ``tlsmilter policy-server``, the policy server as its own process;
- ``worker``: ``tlsmilter worker``, probes for the shared backend;
- ``instrument``: metric labels and the ``/metrics`` endpoint; ``sdnotify``: systemd.
"""
