"""The sideband backend: HSM status from an Oracle-HSM-style sideband database."""
