"""speechssl: self-supervised speech representation learning toolkit."""

__version__ = "0.1.0"
