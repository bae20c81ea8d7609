"""Blob stores: content lives here, the database holds keys and hashes."""
