"""The engine process: the BentoML service that owns the loaded models and runs every generation.

- `service.py`: the GenerationEngine service, reached by the API process through `bentoml.depends`.
- `repository.py`: the ModelRepository over the model store: loading, unloading, and each generation.
- `models/`: model lifecycle (the store catalog, loading, devices, memory, the watchdog, quantization).
- `core/`: continuous batching (the scheduler, the block manager, the engine core's thread, the model
  runner, the KV cache tensors, sampling, detokenizing, the bridge to the event loop).
- `layers/`: the engine's attention over the paged cache, the small-row linear and their C++ kernels.

The packages import nothing heavy on their own: the API workers import `engine.service` for
`bentoml.depends` and need no torch; `engine.core`'s scheduler, block manager and engine core are
pure Python too, so their unit tests run without torch.
"""
