from vreason_kernels.ops.prune_kv.op import prune_cache, prune_kv, pruned_span

__all__ = ["prune_cache", "prune_kv", "pruned_span"]
