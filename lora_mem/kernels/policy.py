"""Which kernels run: one small frozen object, parsed once and handed to every call that dispatches.

    policy = KernelPolicy.from_args(args)                      # a CLI: its --kernels ... flags over the environment
    lm = load_model(name, policy=policy)                       # the model hands it to each norm, rope, attention, LoRA
    results = {**run_info(device, policy), ...}                # every results file records policy.to_dict()

Fields (the defaults are what runs when nothing is said):

* ``kernels``: the LoRA linears (single and multi-adapter). ``auto``: Triton on CUDA tensors, the PyTorch reference
  on CPU tensors; ``triton``: CPU tensors too, through Triton's interpreter (``TRITON_INTERPRET=1``, how the tests
  cover the kernels; without it CPU tensors stay on the reference); ``reference``: the PyTorch reference everywhere.
* ``fused_ops``: the RMSNorm / RoPE / SwiGLU kernels too, wherever the LoRA linears run kernels. Opt-in: they have
  not been timed on a GPU yet.
* ``cpu_attention``: causal attention of CPU training, ``blocks`` (lora_mem.kernels.block_causal_attention) or
  ``sdpa`` (PyTorch's kernel).
* ``tf32``: fp32 products inside the Triton kernels in TF32 (about 1e-3 relative error; off keeps fp32 exact to
  fp32 rounding, as cuBLAS does by default). Torch's own matmuls keep torch's switch.

The environment (``LORA_MEM_KERNELS``, ``LORA_MEM_FUSED_OPS``, ``LORA_MEM_CPU_ATTENTION``, ``LORA_MEM_TF32``) is read
by :meth:`KernelPolicy.from_env` only, which command lines call through :meth:`KernelPolicy.from_args`; the library
itself never reads it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Mapping

import torch

from lora_mem.kernels._common import HAS_TRITON, interpreting

KERNEL_CHOICES = ("auto", "triton", "reference")
CPU_ATTENTION_CHOICES = ("blocks", "sdpa")


@dataclass(frozen=True)
class KernelPolicy:
    kernels: str = "auto"  # LoRA linears: auto | triton | reference
    fused_ops: bool = False  # RMSNorm / RoPE / SwiGLU kernels where the LoRA linears run kernels
    cpu_attention: str = "blocks"  # CPU training's causal attention: blocks | sdpa
    tf32: bool = False  # fp32 products of the Triton kernels in TF32

    def __post_init__(self):
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"KernelPolicy.kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if self.cpu_attention not in CPU_ATTENTION_CHOICES:
            raise ValueError(f"KernelPolicy.cpu_attention must be one of {', '.join(CPU_ATTENTION_CHOICES)}, got "
                             f"{self.cpu_attention!r}")

    def use_triton(self, x: torch.Tensor) -> bool:
        """Whether a LoRA linear with input ``x`` takes the Triton kernels."""
        if self.kernels == "reference" or not HAS_TRITON:
            return False
        if x.is_cuda:
            return True
        return self.kernels == "triton" and x.device.type == "cpu" and interpreting()

    def use_fused_ops(self, x: torch.Tensor) -> bool:
        """Whether RMSNorm / RoPE / SwiGLU on ``x`` take their kernels (each also checks that it covers the inputs)."""
        return self.fused_ops and self.use_triton(x)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelPolicy:
        """The policy the ``LORA_MEM_*`` variables describe (unset: the defaults). ``LORA_MEM_KERNELS=triton`` also
        turns the fused ops on, as it always has."""
        env = os.environ if environ is None else environ

        def choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
            value = env.get(name, "").strip().lower() or default
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
            return value

        def flag(name: str) -> bool:
            value = env.get(name, "").strip().lower() or "0"
            if value not in ("0", "1"):
                raise ValueError(f"{name} must be 0 or 1, got {value!r}")
            return value == "1"

        default = cls()
        kernels = choice("LORA_MEM_KERNELS", default.kernels, KERNEL_CHOICES)
        return cls(kernels=kernels, fused_ops=flag("LORA_MEM_FUSED_OPS") or kernels == "triton",
                   cpu_attention=choice("LORA_MEM_CPU_ATTENTION", default.cpu_attention, CPU_ATTENTION_CHOICES),
                   tf32=flag("LORA_MEM_TF32"))

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> KernelPolicy:
        """The environment's policy with the options of :func:`add_kernel_args` that were given on top."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        return replace(cls.from_env(environ), **given)


def add_kernel_args(parser: argparse.ArgumentParser) -> None:
    """The kernel policy's options; unset ones fall back to the environment, then to the defaults."""
    group = parser.add_argument_group("kernels", "which kernels run (default: LORA_MEM_* variables, else auto, "
                                                 "no fused ops, blocks, no tf32)")
    group.add_argument("--kernels", choices=KERNEL_CHOICES, default=None,
                       help="LoRA linears: auto (Triton on CUDA, reference on CPU), triton (CPU too, under "
                            "TRITON_INTERPRET=1) or reference")
    group.add_argument("--fused-ops", action=argparse.BooleanOptionalAction, default=None,
                       help="RMSNorm / RoPE / SwiGLU kernels too, where the LoRA linears run kernels")
    group.add_argument("--cpu-attention", choices=CPU_ATTENTION_CHOICES, default=None,
                       help="CPU training's causal attention: block GEMMs or PyTorch's SDPA")
    group.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                       help="fp32 products of the Triton kernels in TF32")
