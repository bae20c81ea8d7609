"""Durable background queues (huey on SQLite or Redis)."""
