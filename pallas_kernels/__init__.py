"""Pallas kernels for MiniMax Sparse Attention, their float32 references and the backend dispatch."""
