"""The worker: consumes job messages, runs executors, writes every state change back."""
