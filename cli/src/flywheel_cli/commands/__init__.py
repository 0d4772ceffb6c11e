"""The `flywheel` subcommands: each module adds one with `register(subparsers)`."""
