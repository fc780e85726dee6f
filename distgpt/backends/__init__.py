"""Backends: modules of functions with identical names and signatures (reference.py is the
specification). `get_backend(name)` picks one for the whole model."""
import importlib


def get_backend(name):
    if name == "reference":
        from distgpt.backends import reference
        return reference
    if name == "cuda":
        try:
            return importlib.import_module("distgpt.backends.cuda")
        except ModuleNotFoundError as exc:
            raise RuntimeError(f"backend=cuda is unavailable ({exc.msg}); install the cuda12 or cuda13 "
                               f"extra on a machine with an NVIDIA GPU, or use backend=reference") from None
    raise ValueError(f"backend '{name}': choose reference or cuda")
