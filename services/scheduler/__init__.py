"""The scheduler: wakes workers when jobs are created, and takes back the jobs of dead
workers and expired leases."""
