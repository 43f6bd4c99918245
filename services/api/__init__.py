"""The REST API: validates requests, writes jobs to PostgreSQL, reads them back."""
