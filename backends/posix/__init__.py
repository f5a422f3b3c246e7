"""Plain filesystem storage: files under the archive prefix."""
