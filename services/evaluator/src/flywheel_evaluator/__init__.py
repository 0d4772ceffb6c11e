"""Flywheel's evaluator: golden-set gate, canary rollout on live signals, promote and roll back."""
