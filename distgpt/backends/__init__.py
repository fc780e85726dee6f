"""Backends: the same ops under the same names and signatures (reference.py, a module of
functions, is the specification; the CUDA backend is an object whose methods they are, since it
owns planned scratch). `get_backend(name)` gives one for a model: a new CudaBackend each call."""


def get_backend(name):
    if name == "reference":
        from distgpt.backends import reference
        return reference
    if name == "cuda":
        try:
            from distgpt.backends.cuda import CudaBackend
            return CudaBackend()
        except ModuleNotFoundError as exc:
            raise RuntimeError(f"backend=cuda is unavailable ({exc.msg}); install the cuda12 or cuda13 "
                               f"extra on a machine with an NVIDIA GPU, or use backend=reference") from None
    raise ValueError(f"backend '{name}': choose reference or cuda")
