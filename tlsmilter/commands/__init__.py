"""Operator commands that are not daemons: ``report`` and ``cache``."""
