"""Bulk staging: a WLCG Tape REST API v1 superset and the recall scheduler behind it.

* :mod:`pacifica_like.bulk.store` - requests, per-file state, recall jobs, volume
  claims and pins, in the gateway catalog database;
* :mod:`pacifica_like.web.bulkapi` - the HTTP endpoints (``/.well-known/wlcg-tape-rest-api``,
  ``/api/v1/...``), errors as ``application/problem+json``;
* :mod:`pacifica_like.bulk.scheduler` - recalls queued files volume by volume in
  tape order, with bounded drive use; runs in ``pacifica-like serve`` or
  ``pacifica-like worker``.
"""
