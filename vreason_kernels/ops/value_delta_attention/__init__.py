from vreason_kernels.ops.value_delta_attention.op import value_delta_attention

__all__ = ["value_delta_attention"]
