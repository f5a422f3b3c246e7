"""Pluggable storage behind the archive gateway.

``pacifica_like.storage.contract`` defines the contract, ``pacifica_like.storage.registry`` creates one by
name. Backends depend only on the leaf modules of ``pacifica_like`` (config,
errors, id2filename) and never on the web layer.
"""
