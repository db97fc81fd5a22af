"""The conformance suite's helpers: scenario programs per language and the experiment fixture."""
