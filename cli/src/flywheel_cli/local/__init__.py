"""The local runtime: a Kafka broker and the four services as processes on this machine."""
