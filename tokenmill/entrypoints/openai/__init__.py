"""The OpenAI-compatible HTTP server: protocol.py (request/response models), server.py (the app)."""
