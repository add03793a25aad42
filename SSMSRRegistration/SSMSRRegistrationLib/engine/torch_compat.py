"""What differs between the torch versions the module runs with, detected by feature instead of by version number.

Slicer's macOS packages are x86_64, where PyTorch stops at 2.2.2, so the engine runs on torch 2.2 and newer. Two
calls it makes changed after 2.2:

* ``torch.is_autocast_enabled(device_type)``: the device argument came with torch 2.4; before it the function took
  no argument and answered for CUDA only, and ``torch.is_autocast_cpu_enabled()`` answered for the CPU.
* ``torch.cuda.is_bf16_supported(including_emulation=...)``: the keyword came with torch 2.4; before it the function
  also said True where bfloat16 is only emulated (compute capability below 8.0), so native support is read from the
  compute capability instead.

Everything else the engine, the workflows and the interfaces call exists in torch 2.2 (``torch.autocast`` with a
device type, ``torch.load(weights_only=True)``, ``torch.cuda.mem_get_info``, ``torch.cuda.OutOfMemoryError``,
``torch.backends.cudnn.benchmark``); ``torch.load`` is always given ``weights_only`` explicitly, so the default that
changed in 2.6 does not matter.
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.lru_cache(maxsize=None)
def _takes_device_type(query) -> bool:
    """Whether ``query`` (a ``torch.is_autocast_enabled``) accepts a device type (torch >= 2.4)."""
    try:
        query("cpu")
    except TypeError:
        return False
    return True


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` ("cpu", "cuda", ...) in this thread, on any torch >= 2.2."""
    query = torch.is_autocast_enabled
    if _takes_device_type(query):
        return bool(query(device_type))
    if device_type == "cuda":  # torch < 2.4: the argument-free form answers for CUDA
        return bool(query())
    if device_type == "cpu":
        return bool(torch.is_autocast_cpu_enabled())
    return False


def _accepts_keyword(function, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def cuda_bfloat16_native(device: torch.device | None = None) -> bool:
    """Whether the CUDA ``device`` (None: the current one) runs bfloat16 natively, not by emulation."""
    supported = torch.cuda.is_bf16_supported
    if _accepts_keyword(supported, "including_emulation"):  # torch >= 2.4
        return bool(supported(including_emulation=False))
    if not supported():
        return False
    if getattr(torch.version, "hip", None):  # ROCm: is_bf16_supported() is the answer there
        return True
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def cpu_bfloat16_native() -> bool:
    """Whether the CPU runs bfloat16 convolutions natively (oneDNN with AVX512-BF16 or AMX)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        check = torch.ops.mkldnn._is_mkldnn_bf16_supported
    except (AttributeError, RuntimeError):  # an operator a build does not register
        return False
    return bool(check())
