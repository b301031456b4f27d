"""lmforge's C++ CPU kernels, one extension built with the local C++ compiler on first use and cached by
torch.utils.cpp_extension (~10 s once; later processes load the cached library):
- model/int4_cpu.cpp: the int4 x int8 matmul behind Int4Linear (int4_cpu.py chooses when to use it);
- serve/row_attention.cpp: batch-invariant attention for the paged cache's decode rows.

x86 only (the matmul is written with x86 intrinsics). A failed build (no compiler, a read-only cache)
warns once; PyTorch's int4 kernel and SDPA then do the work.
"""
from __future__ import annotations

import functools
import os
import platform
import re
import warnings
from pathlib import Path

import torch

_PACKAGE = Path(__file__).resolve().parent.parent
SOURCES = [_PACKAGE / "model" / "int4_cpu.cpp", _PACKAGE / "serve" / "row_attention.cpp"]


@functools.cache
def load() -> bool:
    """Builds (first time) and loads the kernels -> whether they are there."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        _build()
    except Exception as exc:
        warnings.warn(f"lmforge's CPU kernels did not build ({exc}); PyTorch's int4 kernel and SDPA do their work",
                      stacklevel=2)
        return False
    # shapes for torch.compile, which calls the ops as extern kernels
    torch.library.register_fake("lmforge_int4::mm")(
        lambda x, packed, out_features, asym, isa: x.new_empty(x.shape[0], out_features))
    torch.library.register_fake("lmforge_rows::attention")(lambda q, k, v, keys, lengths: torch.empty_like(q))
    return True


def _build() -> None:
    from torch.utils import cpp_extension
    try:   # cpp_extension runs `ninja` from PATH; the pip package's binary may not be on it
        import ninja
        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    # torch's cache rebuilds when the sources or flags change, not when torch does: the version is in the name
    name = "lmforge_cpu_kernels_" + re.sub(r"\W", "_", torch.__version__)
    # -fopenmp: at::parallel_for is inline OpenMP (without it the kernels run on one thread); the library it
    # links, libgomp.so.1, is the one torch has already loaded
    cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=["-O3", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
