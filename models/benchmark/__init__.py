"""The benchmark protocol, in one place and torch-free: split readers, metrics, photo transforms, report helpers
and cached embeddings. Training, the edge benchmarks and the server benchmarks all measure through it.
"""
