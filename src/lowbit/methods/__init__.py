"""Compression methods, each registered under a name usable in recipes (``method: rtn``).

Example:
    >>> from lowbit.methods import available_methods
    >>> available_methods()
    ['awq', 'gptq', 'hqq', 'qat', 'rtn', 'smoothquant']
"""

from lowbit.methods import awq, gptq, hqq, qat, rtn, smoothquant  # noqa: F401  (registers the methods)
from lowbit.methods.registry import LayerPlan, Method, MethodContext, available_methods, get_method, register_method

__all__ = ["LayerPlan", "Method", "MethodContext", "available_methods", "get_method", "register_method"]
