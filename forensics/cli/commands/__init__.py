"""CLI commands, one module per area. Each module exposes ``register(app)``."""
