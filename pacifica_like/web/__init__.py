"""The HTTP edge: the WSGI app, the file API, the bulk API, probes, metrics, logs, servers."""
