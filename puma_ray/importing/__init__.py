"""Bring your own 1+N system (docs/bring-your-own.md): a user's model, prompt table, template, readout and logs
in open formats are checked and written as a store bound to their model; a store goes back out the same way."""
from .export_open import export_open
from .run import ImportConfig, import_system

__all__ = ["ImportConfig", "import_system", "export_open"]
