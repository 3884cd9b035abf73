"""The HTTP layer's parts: request and response schemas, the error table, request validation."""
