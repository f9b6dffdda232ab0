"""tlsmilter: keep sensitive e-mail from leaving Postfix over insecure transport."""

from tlsmilter.errors import ConfigError, TlsmilterError, UsageError

__version__ = "0.1.0"

__all__ = ["ConfigError", "TlsmilterError", "UsageError", "__version__"]
