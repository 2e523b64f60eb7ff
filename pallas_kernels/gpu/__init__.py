"""Pallas MSA kernels for NVIDIA GPUs (Triton lowering; runs on jax 0.10.2 interpret and 0.11.2 GPU).

indexer_topk, sparse_attention, dense_attention and msa (both MSA branches in one call, msa.py) take exactly the
arguments of their float32 references in pallas_kernels/reference.py plus `interpret: bool = False`, and raise
NotImplementedError (naming the shapes) for inputs outside their envelope. See indexer.py, attention.py, kv_major.py
and msa.py for the schedules. grouped_matmul (grouped_matmul.py) and msa are exported here too, so that the package
attribute is the function, not its submodule (dispatch looks kernels up with getattr(package, op)).
"""

from pallas_kernels.gpu.attention import dense_attention, sparse_attention
from pallas_kernels.gpu.grouped_matmul import grouped_matmul
from pallas_kernels.gpu.indexer import indexer_topk
from pallas_kernels.gpu.msa import msa

__all__ = ["indexer_topk", "sparse_attention", "dense_attention", "msa", "grouped_matmul"]
