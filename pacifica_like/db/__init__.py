"""Database plumbing shared by every catalog: schema creation, connections, errors, retries."""
