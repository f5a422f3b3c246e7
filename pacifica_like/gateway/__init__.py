"""The gateway's own state over storage: the inventory catalog, audits, leftovers."""
