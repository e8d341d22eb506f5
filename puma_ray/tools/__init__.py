"""Tools around the engine, not part of a migration: installing the packaged real models, synthetic stores and
adapters for conversion tests and benchmarks."""
