"""Leaves every layer uses: settings, errors, ids, HTTP fields, durable writes (stdlib only)."""
