"""Multi-scale deformable attention: pure-JAX reference and Pallas GPU kernel."""

from sarformer_jax.kernels.msda import IMPLEMENTATIONS, ms_deform_attn
from sarformer_jax.kernels.msda_pallas import BlockSizes
from sarformer_jax.kernels.msda_reference import ms_deform_attn_reference

__all__ = ["BlockSizes", "IMPLEMENTATIONS", "ms_deform_attn", "ms_deform_attn_reference"]
