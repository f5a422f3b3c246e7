"""Pluggable storage behind the archive gateway.

``backends.base`` defines the contract, ``backends.factory`` creates one by
name. Backends depend only on the leaf modules of ``pacifica_like`` (config,
errors, id2filename) and never on the web layer.
"""
