"""The HTTP frontend: OpenAI-compatible routes, engine client, detokeniser, metrics."""
