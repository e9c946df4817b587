"""pytest-day0: a day-0 quantized LLM release as a pytest session."""

from pytest_day0.failures import Day0Error, FailureClass, GateFailure, Tier

__all__ = ["Day0Error", "FailureClass", "GateFailure", "Tier"]
__version__ = "0.1.0"
