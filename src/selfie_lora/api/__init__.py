"""HTTP API (FastAPI). ``create_app(settings)`` builds the app; nothing is built at import time."""
