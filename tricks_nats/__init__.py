"""tricks-nats: experiments on distributed systems as code, coordinated through NATS.

Kept import-light on purpose: `tricks-nats --help` and `validate` must not pay for nats-py.
"""

__version__ = "0.1.0"
