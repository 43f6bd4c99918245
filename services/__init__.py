"""The Orchestrix processes: the REST API, the scheduler and the worker."""
