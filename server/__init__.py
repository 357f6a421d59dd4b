"""jaxpaged.server: the OpenAI-compatible HTTP server."""
