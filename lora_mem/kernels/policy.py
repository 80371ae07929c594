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
* ``cpu_bf16``: a model on a CPU is built in bf16 when no dtype is asked for (base weights, activations and the KV
  cache in bf16; the LoRA A/B, their gradients, the optimizer state and the loss reductions stay fp32, as on CUDA).
  By default on exactly when the CPU has bf16 instructions (avx512_bf16 or AMX, :func:`cpu_bf16_instructions`):
  without them torch runs bf16 GEMMs tens of times slower than fp32 (``bench.perf.cpu_bf16`` measures both). An
  explicit dtype (``load_model(dtype=...)``, ``--dtype``) always wins.

The environment (``LORA_MEM_KERNELS``, ``LORA_MEM_FUSED_OPS``, ``LORA_MEM_CPU_ATTENTION``, ``LORA_MEM_TF32``,
``LORA_MEM_CPU_BF16``) is read by :meth:`KernelPolicy.from_env`, which command lines call through
:meth:`KernelPolicy.from_args`. One exception, so that a library call and a command line in the same environment
build the same model: a policy that leaves ``cpu_bf16`` unsaid (None, ``KernelPolicy()``) reads
``LORA_MEM_CPU_BF16`` when a dtype is chosen (:meth:`KernelPolicy.bf16_on_cpu`), never when it is built, so the
policies built as default arguments at import read nothing. The CPU's instructions are read once per process.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

import torch

from lora_mem.kernels._common import HAS_TRITON, interpreting

KERNEL_CHOICES = ("auto", "triton", "reference")
CPU_ATTENTION_CHOICES = ("blocks", "sdpa")
CPU_BF16_CHOICES = ("auto", "on", "off")  # auto: on where the CPU has bf16 instructions
# The --dtype help of every command line: what a model is built in when no dtype is asked for (default_dtype)
DTYPE_DEFAULT_HELP = ("default: bfloat16 on CUDA and on a CPU with bf16 instructions (--cpu-bf16, "
                      "LORA_MEM_CPU_BF16), else float32")
# What a recorded policy without a field ran with (a run of code older than the field): the CPU path was fp32.
FIELDS_ADDED_LATER = {"cpu_bf16": False}


@functools.cache
def cpu_bf16_instructions() -> tuple[str, ...]:
    """The bf16 matrix instructions this CPU has, as torch's cpuinfo reports them: "avx512_bf16", "amx" (AMX tiles,
    which come with AMX-BF16); empty where it has none (bf16 GEMMs are then converted to fp32 and run slower)."""
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return tuple(name for name, check in checks.items() if getattr(torch.cpu, check, lambda: False)())


def cpu_has_bf16() -> bool:
    return bool(cpu_bf16_instructions())


def env_choice(name: str, default: str, allowed: tuple[str, ...], environ: Mapping[str, str] | None = None) -> str:
    """One LORA_MEM_* variable, lower-cased, checked against `allowed` (unset or blank: `default`)."""
    value = (os.environ if environ is None else environ).get(name, "").strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def resolve_cpu_bf16(choice: str) -> bool:
    """A --cpu-bf16 / LORA_MEM_CPU_BF16 choice as the policy's flag: auto follows the CPU's instructions."""
    if choice not in CPU_BF16_CHOICES:
        raise ValueError(f"cpu_bf16 must be one of {', '.join(CPU_BF16_CHOICES)}, got {choice!r}")
    return cpu_has_bf16() if choice == "auto" else choice == "on"


@dataclass(frozen=True)
class KernelPolicy:
    kernels: str = "auto"  # LoRA linears: auto | triton | reference
    fused_ops: bool = False  # RMSNorm / RoPE / SwiGLU kernels where the LoRA linears run kernels
    cpu_attention: str = "blocks"  # CPU training's causal attention: blocks | sdpa
    tf32: bool = False  # fp32 products of the Triton kernels in TF32
    # CPU models in bf16 unless a dtype is asked for; None: LORA_MEM_CPU_BF16 when a dtype is chosen (bf16_on_cpu)
    cpu_bf16: bool | None = None

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

    def bf16_on_cpu(self, environ: Mapping[str, str] | None = None) -> bool:
        """``cpu_bf16``, or where it is unsaid, what LORA_MEM_CPU_BF16 says now (auto: the CPU's instructions)."""
        if self.cpu_bf16 is not None:
            return self.cpu_bf16
        return resolve_cpu_bf16(env_choice("LORA_MEM_CPU_BF16", "auto", CPU_BF16_CHOICES, environ))

    def default_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype a model on ``device`` is built in when none is asked for: bf16 on CUDA, and on a CPU where
        :meth:`bf16_on_cpu` says so; fp32 otherwise."""
        return torch.bfloat16 if device.type == "cuda" or self.bf16_on_cpu() else torch.float32

    def to_dict(self) -> dict:
        """The policy as a results file records it: ``cpu_bf16`` resolved to what a model would be built with."""
        return {**asdict(self), "cpu_bf16": self.bf16_on_cpu()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelPolicy:
        """The policy the ``LORA_MEM_*`` variables describe (unset: the defaults). ``LORA_MEM_KERNELS=triton`` also
        turns the fused ops on, as it always has."""
        env = os.environ if environ is None else environ

        def flag(name: str) -> bool:
            return env_choice(name, "0", ("0", "1"), env) == "1"

        default = cls()  # the string defaults
        kernels = env_choice("LORA_MEM_KERNELS", default.kernels, KERNEL_CHOICES, env)
        return cls(kernels=kernels, fused_ops=flag("LORA_MEM_FUSED_OPS") or kernels == "triton",
                   cpu_attention=env_choice("LORA_MEM_CPU_ATTENTION", default.cpu_attention, CPU_ATTENTION_CHOICES, env),
                   tf32=flag("LORA_MEM_TF32"), cpu_bf16=default.bf16_on_cpu(env))

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> KernelPolicy:
        """The environment's policy with the options of :func:`add_kernel_args` that were given on top."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        if "cpu_bf16" in given:  # the option is a choice (auto / on / off), the field its outcome
            given["cpu_bf16"] = resolve_cpu_bf16(given["cpu_bf16"])
        return replace(cls.from_env(environ), **given)


def add_kernel_args(parser: argparse.ArgumentParser) -> None:
    """The kernel policy's options; unset ones fall back to the environment, then to the defaults."""
    group = parser.add_argument_group("kernels", "which kernels run (default: LORA_MEM_* variables, else auto, "
                                                 "no fused ops, blocks, no tf32, cpu-bf16 auto)")
    group.add_argument("--kernels", choices=KERNEL_CHOICES, default=None,
                       help="LoRA linears: auto (Triton on CUDA, reference on CPU), triton (CPU too, under "
                            "TRITON_INTERPRET=1) or reference")
    group.add_argument("--fused-ops", action=argparse.BooleanOptionalAction, default=None,
                       help="RMSNorm / RoPE / SwiGLU kernels too, where the LoRA linears run kernels")
    group.add_argument("--cpu-attention", choices=CPU_ATTENTION_CHOICES, default=None,
                       help="CPU training's causal attention: block GEMMs or PyTorch's SDPA")
    group.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                       help="fp32 products of the Triton kernels in TF32")
    group.add_argument("--cpu-bf16", choices=CPU_BF16_CHOICES, default=None,
                       help="a CPU model in bf16 (LoRA, optimizer and loss in fp32) when no --dtype is given: auto "
                            "where the CPU has bf16 instructions (avx512_bf16, AMX), on, or off (fp32)")
