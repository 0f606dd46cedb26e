"""The NumPy backend's ops, one family per module; `numpy_backend` re-exports them."""
