"""Pallas kernels for the decode hot path, each beside the plain-`jnp` reference it must match.

The references are the kernel contract: CPU runs them, the model uses them where no kernel applies, and every
kernel test compares against them. Their shapes are documented in each docstring; change them only together
with the kernels.
"""

from pallas_kernels.grouped_gemm import grouped_ffn, grouped_ffn_reference, grouped_gemm, grouped_gemm_reference
from pallas_kernels.paged_gqa_decode import paged_gqa_decode, paged_gqa_decode_reference

__all__ = ["grouped_ffn", "grouped_ffn_reference", "grouped_gemm", "grouped_gemm_reference", "paged_gqa_decode",
           "paged_gqa_decode_reference"]
