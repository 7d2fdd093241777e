"""The software version (kept apart so low-level modules can import it without cycles)."""

__version__ = "0.1.0"
CREATOR = f"llmarc {__version__}"
