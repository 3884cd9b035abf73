"""The API process's adapters: the engine client, the response cache backends, and the graceful drain
that both processes' BentoML services install."""
