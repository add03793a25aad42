"""Adam for test-time training, without the start-up cost of ``torch.optim``.

Every ``torch.optim`` optimizer imports ``torch._dynamo`` (the compiler stack) the first time one is built: 1.9 s of
CPU with torch 2.13 and 1.2 s with torch 2.2.2 (Slicer's on x86_64 macOS) in each process that registers, measured on
a 2-core AMD EPYC (``python -c "import torch; torch.optim.Adam(torch.nn.Linear(2, 2).parameters())"`` against the
import alone). A registration from Slicer or the command line is one process, so this cost was paid on every run.

The update below is ``torch.optim.Adam``'s own on the CPU (its single-tensor path without weight decay or amsgrad,
in torch 2.2 to 2.13), operation for operation: the weights it gives are bit-identical (test_slicer_runtime, under
both torch versions). Pretraining keeps ``torch.optim.Adam``, whose state its checkpoints store.
"""

from __future__ import annotations

import math
from typing import Iterable, Tuple

import torch


class Adam:
    """Adam (Kingma and Ba) on ``parameters``: learning rate ``lr``, moment decays ``betas``, denominator guard
    ``eps``. Use as ``torch.optim.Adam``: ``zero_grad()``, backward, ``step()``."""

    def __init__(self, parameters: Iterable[torch.Tensor], lr: float, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.parameters = list(parameters)
        self.lr, self.betas, self.eps = lr, betas, eps
        #: parameter index -> [steps taken, first moment, second moment], created at its first gradient (each
        #: parameter counts its own steps for the bias corrections, as torch.optim.Adam does)
        self.state = {}

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for index, parameter in enumerate(self.parameters):
            grad = parameter.grad
            if grad is None:
                continue
            if index not in self.state:
                self.state[index] = [0, torch.zeros_like(parameter, memory_format=torch.preserve_format),
                                     torch.zeros_like(parameter, memory_format=torch.preserve_format)]
            state = self.state[index]
            state[0] += 1
            steps, first, second = state
            step_size = self.lr / (1 - beta1 ** steps)
            bias_correction2_sqrt = math.sqrt(1 - beta2 ** steps)
            first.lerp_(grad, 1 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (second.sqrt() / bias_correction2_sqrt).add_(self.eps)
            parameter.addcdiv_(first, denominator, value=-step_size)
