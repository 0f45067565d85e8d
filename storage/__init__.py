"""Storage: SQLAlchemy schema, the Repository (batched writer thread) and the review queries."""
from storage.repository import Repository

__all__ = ["Repository"]
