"""Benchmarks: the weak-link race, the async throughput, the Glow kernels and memory."""
