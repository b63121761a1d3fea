"""Built-in architectures, one module each, registered through entry points in pyproject.toml."""
