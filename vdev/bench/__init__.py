"""Benchmarks: the same workload across service models."""
