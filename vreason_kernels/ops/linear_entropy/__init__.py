from vreason_kernels.ops.linear_entropy.op import linear_entropy

__all__ = ["linear_entropy"]
