"""The HTTP front end (OpenAI-compatible API, health and metrics), the router over replicas, and
cluster membership. Nothing imports ``server``.
"""
