"""The generation engine: model store access, loading, device placement, generation and memory.

Everything torch lives here. The package itself imports nothing heavy: `runners.client` is what the
API process uses, `runners.engine` is the BentoML service that runs in the engine process.
`runners.response_cache` holds the API process's response cache adapters (Redis, the lookup counter).
"""
