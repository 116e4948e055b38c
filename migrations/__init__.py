"""Alembic migrations of the service database; run them with ``service.db.upgrade(url)``."""
