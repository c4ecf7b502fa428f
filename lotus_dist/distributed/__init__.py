from . import compat  # noqa: F401  (shims for torch 2.6/2.7, applied before any module of this package runs)
