"""Face analysis adapters (the ``FaceAnalyzer`` port)."""
