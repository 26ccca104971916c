"""Benchmark half of the toolkit: run registry methods over a built dataset, score, publish."""
