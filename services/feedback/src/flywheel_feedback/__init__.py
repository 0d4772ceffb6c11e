"""Flywheel feedback service: ratings and corrections, validated, redacted, acknowledged by Kafka."""
