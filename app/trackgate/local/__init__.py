"""One machine without systemd or Docker: `trackgate up|down|status` and `serve-model`."""
