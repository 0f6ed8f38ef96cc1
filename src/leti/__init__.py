"""LETI: learning to generate code from textual interactions (execution feedback)."""

__version__ = "0.1.0"
