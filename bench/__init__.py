"""Benchmarks of tricks-nats' coordination, side by side with the raw NATS floor, ZooKeeper and
Redis, in one run on one machine. `python -m bench --help`; not part of the test suite."""
