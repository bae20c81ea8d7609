"""Alembic migrations, run by ``selfie_lora.adapters.db.migrate.upgrade``."""
