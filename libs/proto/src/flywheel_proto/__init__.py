"""Generated stubs for Flywheel's protos; regenerate with scripts/gen-protos, never edit."""
