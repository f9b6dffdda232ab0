"""The Redis parts of the shared backend.

- ``connection``: connecting (URL, Sentinel, TLS) and ``Health`` (outage start and end);
- ``records``: the key layout and the stored record, pure, used by the cache and the worker;
- ``cache``: the shared assessment cache;
- ``queue``: the probe queue on a Stream, with its Lua scripts (milter and worker sides).
"""
