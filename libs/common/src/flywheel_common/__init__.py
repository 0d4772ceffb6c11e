"""What Flywheel's services share: plumbing only."""
