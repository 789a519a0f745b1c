"""FLAM: frame-wise language-audio modeling for open-vocabulary sound event detection."""

__version__ = "0.1.0"
