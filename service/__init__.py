"""The FastAPI inference service (built in the service issue)."""
