"""robust_ebm: energy-based robust classifiers, reproduced."""

__version__ = "0.1.0"
