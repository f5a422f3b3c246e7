"""Emulated tape library: volumes, drives, the catalog and the C stager that moves records."""
