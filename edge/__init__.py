"""Concord on the device, without torch: int8 quantisation, the search client, device benchmarks."""
