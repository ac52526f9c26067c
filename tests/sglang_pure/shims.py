"""Stand-ins for the heavy packages SGLang 0.5.19 imports at module level but never runs while it parses
server arguments or validates request bodies: only for ``tests/sglang_pure/check.py``'s subprocess.

What is checked stays SGLang's own code (``ServerArgs``, its resolution and ``check_server_args``, the
``io_struct`` request structs, ``SamplingParams``, the HTTP routes); only these imports are replaced:

- ``triton`` (1 GB, CUDA kernels): ``sglang.srt.utils.common`` and the kernel modules import it and decorate
  kernels with ``@triton.jit`` at import time.
- ``torchvision``: ``common.py`` imports ``decode_jpeg``; PyPI's build is CUDA-linked and fails to load next to
  the CPU torch here (``operator torchvision::nms does not exist``).
- ``xgrammar`` (114 MB with tvm-ffi): structured-output grammars; its names are only type annotations of
  the OpenAI protocol models, so they stand for ``typing.Any`` (what SGLang itself uses when it is missing).
- ``IPython`` (notebook display), ``compressed_tensors``, ``gguf`` (quantisation formats), ``sentencepiece``
  (tokenizers of other models).

A stand-in module answers every attribute with a placeholder that is callable (a decorator returns what it
decorates), indexable and usable as a base class: enough to import, useless to run (nothing here runs it).

Order matters: ``install()`` first imports the parts of torch that probe for triton at import time
(``torch._dynamo``, ``torch._inductor``, the flop counter) so that they record "no triton"; a stand-in seen by
torch would send it down its triton code paths, which then fail.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
import typing

STUBBED = ("triton", "torchvision", "IPython", "compressed_tensors", "gguf", "sentencepiece")
AS_ANY = ("xgrammar",)  # names used only in type annotations of pydantic models: typing.Any


class _Placeholder:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, name: str) -> _Placeholder:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self._name}.{name}")

    def __call__(self, *args: object, **kwargs: object) -> object:
        if len(args) == 1 and callable(args[0]) and not kwargs:  # @triton.jit and friends
            return args[0]
        return _Placeholder(f"{self._name}()")

    def __getitem__(self, key: object) -> _Placeholder:
        return self

    def __iter__(self):
        return iter(())

    def __or__(self, other: object) -> _Placeholder:
        return self

    __ror__ = __or__

    def __mro_entries__(self, bases: tuple) -> tuple:  # `class K(triton.Config)` at module level
        return (object,)


class _Module(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        if self.__name__.split(".")[0] in AS_ANY:
            return typing.Any
        return _Placeholder(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, name: str, path: object, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in STUBBED + AS_ANY:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Module(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # a package: any submodule resolves to a stand-in too
        module.__version__ = "0+shim"


def install() -> None:
    import torch.utils._triton

    torch.utils._triton.has_triton_package()  # cached: False
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    import torch.utils.flop_counter  # noqa: F401

    sys.meta_path.insert(0, _Finder())
