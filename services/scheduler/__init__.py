"""The scheduler: claims due jobs from PostgreSQL and announces them on NATS JetStream."""
