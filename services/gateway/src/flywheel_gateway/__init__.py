"""Flywheel's gateway: the site widget, its HTTP API and the review console."""
