"""Flywheel evaluation: dataset format, quality metrics with bootstrap intervals, and the dataset checker."""
