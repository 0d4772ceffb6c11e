"""The simulation: visitors and an expert drive a running stack; the report of what changed."""
