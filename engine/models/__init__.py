"""Model lifecycle: the store catalog, loading, devices and dtypes, memory, the watchdog, quantization."""
