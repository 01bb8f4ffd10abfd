"""Runs the tests as on a CPU without AVX512-BF16, on one that has it: put this directory
on PYTHONPATH (`make test-without-avx512-bf16`). bitsandbytes 0.50 asks the CPU once,
through bitsandbytes.functional.has_avx512bf16, when its CPU backend registers kernels and
when each Linear4bit is built; this answers False from the moment the module is loaded.
Processes the tests start with their own PYTHONPATH (the e2e jobs) are not affected."""

import importlib.abc
import sys


class _AnswerNo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            module.has_avx512bf16 = lambda: False

        spec.loader.exec_module = exec_module
        return spec


import importlib.util  # noqa: E402

sys.meta_path.insert(0, _AnswerNo())
