"""Database access: the connection pool and one module of named queries per table."""
