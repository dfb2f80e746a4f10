"""HTTP server over the engine: basilisk-compatible and OpenAI-compatible endpoints."""
