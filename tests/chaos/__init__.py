"""The chaos suite: real processes and servers, killed and restarted while jobs run."""
