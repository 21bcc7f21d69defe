"""The FastAPI inference service: settings, routes, scoring, errors (DESIGN.md section 6)."""
