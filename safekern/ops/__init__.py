"""Fast kernels, one op per file: jit kernels -> launcher -> public function.

Importing this package registers every backend that ships with safekern. May import ``spec``,
``_checks`` and ``reference`` (each kernel's twin); never transformers or anything above.
"""
from . import dispatch
from .attention import ess_attention
from .attention_varlen import ess_attention_varlen
from .head_sample import head_sample
from . import cuda_backend  # noqa: F401  (registers backend "cuda")

__all__ = ["dispatch", "ess_attention", "ess_attention_varlen", "head_sample"]
