"""Flywheel trainer: feedback -> training examples -> datasets -> fine-tuning jobs -> candidate models."""
