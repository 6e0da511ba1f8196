"""raylocal: train Glow normalizing flows in parts, without end-to-end backprop, on Ray."""

__version__ = "0.1.0"
