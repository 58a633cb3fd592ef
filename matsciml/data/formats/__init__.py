"""On-disk formats: one module per format (see docs/architecture.md)."""
