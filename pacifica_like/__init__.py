"""pacifica_like: a REST archive gateway for hierarchical storage.

Wire-compatible with Pacifica's Archive Interface: ``GET/PUT/HEAD/POST/PATCH``
on ``/<integer id>``. Start it with ``pacifica-like serve`` or under uWSGI
with ``--module pacifica_like.wsgi``.
"""

__version__ = "0.1.0"
