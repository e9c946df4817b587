"""Serving: the embedded reference engine and the endpoint handles the scorer talks to."""
