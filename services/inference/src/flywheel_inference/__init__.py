"""Flywheel's inference service."""
