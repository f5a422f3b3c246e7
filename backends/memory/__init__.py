"""In-memory storage: a test double and the proof that the backend contract is the only coupling."""
