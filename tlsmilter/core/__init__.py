"""The pure core: every decision tlsmilter takes, with no I/O and no metrics.

- ``levels``: the transport-security levels and how they order;
- ``domains``: mail domain normalisation;
- ``sensitivity``: which policy a message's headers ask for;
- ``verdict``: ``decide``, one verdict per message from its policy and its domains' levels;
- ``reasons``: why a recipient domain failed a policy, as codes and plain text;
- ``delivery``: ``policy_for``, the Postfix TLS policy that enforces an assessed level;
- ``decisionlog``: the one decision-log line per sensitive message, formatted and parsed.
"""
