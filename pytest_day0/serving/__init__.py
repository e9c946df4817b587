"""Serving: the embedded reference engine and the endpoint handles the scorer talks to."""

# The reference server's values that callers check before starting it: here, so the CLI's parser and the serve
# stage read them without importing the server (torch) or the serve stage (httpx).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1"})
REFERENCE_MAX_BATCH = 64
