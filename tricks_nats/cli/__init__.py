"""The `tricks-nats` command."""
