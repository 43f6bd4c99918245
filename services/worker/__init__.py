"""The worker: claims due jobs for its free slots, runs executors, writes every state
change back."""
