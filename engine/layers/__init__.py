"""The engine's own layers: attention over the paged KV cache, the small-row linear, their C++ kernels."""
