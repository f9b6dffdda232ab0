"""Where assessments live: one ``Assessments`` interface, two implementations.

- ``base``: the interface, cache entries, and freshness (hit, stale, miss; due for refresh),
  decided once for both backends;
- ``embedded``: the default, an in-process cache (``memory``) filled by an in-process prober;
- ``shared``: the Redis cache of a fleet, filled by ``tlsmilter worker`` processes; its
  Redis parts live in ``redis/`` (connection, records, cache, queue).
"""
