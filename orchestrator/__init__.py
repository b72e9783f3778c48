"""bgsync: blue-green schema sync orchestrator for PostgreSQL."""

__version__ = "0.1.0"
