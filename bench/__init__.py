"""Benchmark pacifica_like against pacifica-archiveinterface 0.4.2 on the same machine.

``python -m bench`` runs both servers under identical uWSGI flags and prints one
comparison table (see bench/README.md). Nothing here is imported by the service.
"""
