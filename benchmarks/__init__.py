"""Benchmark scripts; importable as a package so tests can reach their helpers."""
