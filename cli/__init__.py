"""The `caduceus` command line."""
