"""Simulated device firmware used by the demo and the tests."""
