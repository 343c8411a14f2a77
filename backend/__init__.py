"""Inference engine: model catalogue, ModelManager, local and remote generation.

Nothing in this package imports Django, so the web process, a Celery worker, the
management commands and ``test_backend.py`` all share it.
"""
