"""The `tricks-nats` command (installed as `tricks_nats.cli`)."""
