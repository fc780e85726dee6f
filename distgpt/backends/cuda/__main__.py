"""`python -m distgpt.backends.cuda NAME`: the -D flags kernels/NAME.cu is compiled with (its
launch constants, defined in the Python module that launches it), for compiling it by hand:
    nvcc -arch=sm_90 -Ikernels -c kernels/layernorm.cu $(python -m distgpt.backends.cuda layernorm)"""
import sys

from distgpt.backends.cuda import adamw, bias, classifier, encoder, fp8, gelu, layernorm, norm, transpose

MODULES = {m.KERNELS.name: m.KERNELS for m in (adamw, bias, classifier, encoder, fp8, gelu, layernorm, norm,
                                          transpose)}


def main(argv):
    if len(argv) != 1 or argv[0] not in MODULES:
        sys.exit(f"usage: python -m distgpt.backends.cuda NAME, NAME one of {', '.join(sorted(MODULES))}")
    print(" ".join(MODULES[argv[0]].compiler_flags()))


if __name__ == "__main__":
    main(sys.argv[1:])
