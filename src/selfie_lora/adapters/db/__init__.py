"""SQLAlchemy repository (SQLite by default, PostgreSQL by URL) and its Alembic migrations."""
