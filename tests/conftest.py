"""Test-session setup shared by all test files.

Triton decides between compiling and interpreting when *it* is imported (its own library
functions, tl.cdiv, tl.max, ..., are decorated then), not when our kernels are called. A
process that wants the interpreter must therefore set TRITON_INTERPRET=1 before anything
imports triton. Without CUDA the interpreter is the only way to run the kernels at all, so
the test session asks for it here, first, unless the caller chose otherwise.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
