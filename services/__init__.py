"""The services, each its own process: api, scheduler, worker (``orchestrix.services``)."""
