"""Helpers for tests/test_launch.py that run in child processes (importable with PYTHONPATH=tests)."""
