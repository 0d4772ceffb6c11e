"""The flywheel command."""
