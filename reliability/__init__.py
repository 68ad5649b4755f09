"""Reliability and security suites: each starts the real service on loopback and prints a figure table."""
