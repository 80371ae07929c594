"""Compile every Triton kernel of lora_mem for real GPUs (H100 sm_90, A100 sm_80) on a machine without one.

    python -m bench.perf.compile_check                          # sm_90 and sm_80, bf16 fp16 fp32 tf32: what CI runs
    python -m bench.perf.compile_check --archs 90 --dtypes fp32 --all-configs --json runs/compile_fp32.json
    python -m bench.perf.compile_check --only "bf16 lora" --verbose     # a subset, each compile as it finishes

Triton's interpreter, which runs the kernels in the tests, compiles nothing: it ignores autotune configs, shared
memory, registers and spills. This check does, per architecture in a process of its own, what a GPU's first launches
would do, and stops before anything would touch a device:

1. A stand-in Triton driver (:class:`StandInDriver`) reports the target: its capability, opt-in shared memory per
   block and SM count. The launchers ask Triton for these (``lora_mem.kernels._common.target_limits``), so their
   split counts and config pruning are the target's.
2. The project's own entry points run forward and backward on ``meta`` tensors (:func:`scenarios`). Triton's
   ``jit_cache_hook`` skips each compile-and-launch; a pre-run hook on every ``@triton.jit`` kernel records the
   arguments exactly as the launcher passed them and, for an autotuned kernel, the configs its ``early_config_prune``
   keeps there.
3. Each launch is compiled through ``JITFunction.warmup`` (the JIT's own argument specialisation: 16-divisibility,
   ints equal to 1, 32/64-bit) down to a cubin with the ptxas in the triton wheel, once for its own config, or for an
   autotuned launch once for the smallest config kept, the largest (shared memory) and the one with the largest tile
   per thread (registers). Shared memory comes from the compiled metadata, registers and spills from ``ptxas -v``;
   identical binaries are compiled once per run.

What CI compiles (the default) is small but complete: every kernel in every dtype with every flag its launchers set,
one launch per site at rank 16 and, for the LoRA kernels, at the largest rank; fp16 only its smallest configs (its
tiles compile as bf16's do). ``--all-configs`` compiles every kept config of the same launches, the full sweep.
Each architecture's worker keeps its own Triton cache for the run, so a binary two launches share compiles once.

It fails (exit 1) on: a compile error; a launch site with no compiled config that fits the target (shared memory,
registers); a kept config that does not fit (the autotuner would compile it and throw it away at load); spill stores
above ``SPILL_LIMIT_BYTES``; a ``@triton.jit`` kernel of lora_mem.kernels that no scenario launches.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import linecache
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Gpu:
    arch: int  # compute capability x 10, as Triton's GPUTarget spells it
    name: str
    smem_optin: int  # cudaDevAttrMaxSharedMemoryPerBlockOptin: what Triton compares a kernel's shared memory with
    sms: int


GPUS = {90: Gpu(90, "H100 SXM (sm_90a)", 232448, 132), 80: Gpu(80, "A100 (sm_80)", 166912, 108)}
REGISTERS_PER_BLOCK = 65536  # both architectures; allocated per warp in units of 256
DTYPES = ("bf16", "fp16", "fp32", "tf32")

# Spill stores per thread a kept config may have: four 32-bit registers. A kernel at the edge of its register budget
# spills a value or two that live across the K-loop (a few bytes, stored once); the spills that cost are the K-loop's
# own operands and accumulator, hundreds of bytes to tens of KB per thread, which nothing kept may have. Tighter, the
# check would drop good tiles over one register, and move with every ptxas release.
SPILL_LIMIT_BYTES = 16

# The shapes: Qwen2.5-1.5B (hidden 1536, MLP 8960, 12 query / 2 KV heads of 128), 8192 tokens, LoRA rank 16.
TOKENS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, RANK = 8192, 1536, 8960, 12, 2, 128, 16
ADAPTERS = 4  # multi-LoRA: adapters in the stack


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one architecture
# ---------------------------------------------------------------------------------------------------------------------


class StandInDriver:
    """Just enough of a Triton driver for the JIT and the autotuner on a machine without the GPU: the target, device 0,
    stream 0, the device's properties, and a benchmarker that runs nothing (by default every config ties)."""

    def __init__(self, gpu: Gpu, benchmarker=None):
        from types import SimpleNamespace

        self.gpu = gpu
        self.benchmarker = benchmarker or (lambda kernel_call, quantiles=None, **kwargs: [1.0, 1.0, 1.0])
        props = {"max_shared_mem": gpu.smem_optin, "multiprocessor_count": gpu.sms, "max_num_regs": REGISTERS_PER_BLOCK,
                 "warpSize": 32}
        self.utils = SimpleNamespace(get_device_properties=lambda device: dict(props))

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.gpu.arch, 32)

    def get_benchmarker(self):
        return self.benchmarker


@dataclass
class Launch:
    """One kernel launch the launchers made: the kernel, its arguments, and the configs to compile for it."""

    kernel: object  # the JITFunction
    site: str  # where in lora_mem it was launched from, e.g. "LoRALinearFunction.backward grad_A"
    scenario: str
    args: tuple
    constexprs: dict  # keyword arguments the launcher passed (flags, BLOCK_R, ...), config keys excluded
    options: dict  # num_warps / num_stages the launcher passed (non-autotuned kernels)
    kept: list = field(default_factory=list)  # triton.Config kept by early_config_prune (autotuned kernels)
    declared: int = 1  # configs the autotuner declares
    largest: bool = True  # compile the largest kept configs too, not only the smallest


def kernel_modules():
    import lora_mem.kernels.lora_linear as lora_linear
    import lora_mem.kernels.multi_lora_linear as multi_lora_linear
    import lora_mem.kernels.rms_norm as rms_norm
    import lora_mem.kernels.rope as rope
    import lora_mem.kernels.swiglu as swiglu

    return [lora_linear, multi_lora_linear, rms_norm, rope, swiglu]


def project_kernels():
    """(every @triton.jit kernel of the kernel modules, {kernel: its Autotuner})."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    kernels, autotuners = [], {}
    for module in kernel_modules():
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value not in kernels:
                kernels.append(value)
            elif isinstance(value, Autotuner):
                autotuners[value.fn] = value
    return kernels, autotuners


def _site() -> str:
    """The function in lora_mem that called the launcher, and the name its result is assigned to."""
    kernels_dir = str(REPO_ROOT / "lora_mem" / "kernels")
    frame, outer = sys._getframe(2), None
    while frame is not None:
        if frame.f_code.co_filename.startswith(kernels_dir):
            outer = frame
        elif outer is not None:
            break
        frame = frame.f_back
    if outer is None:
        return "?"
    line = linecache.getline(outer.f_code.co_filename, outer.f_lineno)
    target = re.match(r"\s*([\w, ]+?)\s*=[^=]", line)
    name = getattr(outer.f_code, "co_qualname", outer.f_code.co_name)
    return name + (f" {target.group(1).replace(' ', '')}" if target else f":{outer.f_lineno}")


class Recorder:
    """Records every launch of the project's kernels instead of compiling and running it."""

    def __init__(self):
        self.kernels, self.autotuners = project_kernels()
        self.launches: list[Launch] = []
        self.scenario = ""
        self.largest = True
        self.recording = False
        for kernel in self.kernels:
            kernel.add_pre_run_hook(self._hook(kernel))

    def _hook(self, kernel):
        def record(*args, **kwargs):
            if not self.recording:
                return
            autotuner = self.autotuners.get(kernel)
            config_keys = set(autotuner.configs[0].all_kwargs()) if autotuner else set()
            constexprs = {k: v for k, v in kwargs.items() if k in kernel.arg_names and k not in config_keys}
            options = {k: kwargs[k] for k in ("num_warps", "num_stages")
                       if k in kwargs and k not in config_keys and kwargs[k] is not None}
            launch = Launch(kernel, _site(), self.scenario, args, constexprs, options, largest=self.largest)
            if autotuner is not None:
                named = dict(zip(autotuner.arg_names, args))
                prune = autotuner.early_config_prune
                launch.kept = prune(autotuner.configs, named, **constexprs) if prune else list(autotuner.configs)
                launch.declared = len(autotuner.configs)
            self.launches.append(launch)

        return record

    @contextlib.contextmanager
    def scenario_of(self, name: str, largest: bool):
        import triton

        self.scenario, self.largest, self.recording = name, largest, True
        triton.knobs.runtime.jit_cache_hook = lambda *args, **kwargs: True  # skip the compile (and the launch)
        try:
            yield
        finally:
            triton.knobs.runtime.jit_cache_hook = None
            self.recording = False


def scenarios(dtypes: list[str]):
    """(name, function, whether to compile the largest configs) per launch scenario: every kernel with every flag its
    launchers set, in each dtype ("tf32": fp32 tensors with the kernels' TF32 switch on, LoRA kernels only), at rank 16
    and at the largest rank."""
    import torch

    from lora_mem.kernels import lora_linear as L
    from lora_mem.kernels import multi_lora_linear as ML
    from lora_mem.kernels import rms_norm as RN
    from lora_mem.kernels import rope as RP
    from lora_mem.kernels import swiglu as SG

    def meta(*shape, dtype, grad=False):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

    out = []
    for name in dtypes:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}[name]
        tf32 = {"tf32": True} if name == "tf32" else {}  # the launchers' keyword, given only where it is on
        # fp16 compiles to bf16's tiles (same element size, same tensor-core path: every LoRA kernel's shared memory,
        # registers and spills come out equal), so for fp16 the smallest config of each launch site is compiled, at
        # rank 16; the largest configs and rank are bf16's.
        ranks = [RANK] if name == "fp16" else [RANK, L.MAX_RANK]
        largest = name != "fp16"

        def lora(bias, dropout, rank, dt=dt, tf32=tf32):
            x = meta(TOKENS, HIDDEN, dtype=dt, grad=True)
            w, b = meta(HIDDEN, HIDDEN, dtype=dt), (meta(HIDDEN, dtype=dt) if bias else None)
            a, bb = meta(rank, HIDDEN, dtype=dt, grad=True), meta(HIDDEN, rank, dtype=dt, grad=True)
            y = L.lora_linear_triton(x, w, b, a, bb, 2.0, dropout_p=dropout, training=dropout > 0, **tf32)
            y.backward(torch.empty_like(y))

        def multi(rank, dt=dt, tf32=tf32):
            with torch.no_grad():
                x = meta(TOKENS, HIDDEN, dtype=dt)
                plan = ML.AdapterRowPlan(*(meta(TOKENS, dtype=torch.int32) for _ in range(3)))
                t = ML._multi_shrink(x, plan, meta(ADAPTERS, rank, HIDDEN, dtype=dt),
                                     meta(ADAPTERS, dtype=torch.float32), **tf32)
                ML._multi_lora_matmul(x, meta(HIDDEN, HIDDEN, dtype=dt).t(), t, meta(ADAPTERS, HIDDEN, rank, dtype=dt),
                                      plan, meta(HIDDEN, dtype=dt), **tf32)

        # q_proj (bias) with dropout and o_proj (no bias) without: every flag of both LoRA kernels. The same
        # 1536 x 1536 shape for both, so launches that differ in no flag compile to one binary. TF32 (opt-in, the
        # slowest to compile) gets its largest configs where its tiles are largest, with dropout and in multi-LoRA at
        # the largest rank, and elsewhere its smallest.
        for rank in ranks:
            suffix = "" if rank == RANK else f" r{rank}"
            out.append((f"{name} lora q_proj dropout{suffix}", lambda lora=lora, r=rank: lora(True, 0.05, r),
                        largest))
            out.append((f"{name} multi_lora q_proj{suffix}", lambda multi=multi, r=rank: multi(r),
                        largest and (name != "tf32" or rank != RANK)))
        out.append((f"{name} lora o_proj", lambda lora=lora: lora(False, 0.0, RANK), largest and name != "tf32"))
        if name == "tf32":
            continue  # the row and elementwise kernels have no dot: tf32 is fp32 there

        def rms(N, weight_grad, dt=dt):
            x = meta(TOKENS, N, dtype=dt, grad=True)
            y = RN.rms_norm_triton(x, meta(N, dtype=dt, grad=weight_grad), 1e-6)
            y.backward(torch.empty_like(y))

        out.append((f"{name} rms_norm", lambda rms=rms: rms(HIDDEN, True), True))
        out.append((f"{name} rms_norm frozen weight", lambda rms=rms: rms(HIDDEN, False), True))
        out.append((f"{name} rms_norm largest row", lambda rms=rms: rms(RN.MAX_HIDDEN, True), True))

        def rope(dt=dt, B=4):
            T = TOKENS // B
            q = meta(B, T, HEADS, HEAD_DIM, dtype=dt, grad=True).transpose(1, 2)  # the model's (B, H, T, D) views
            k = meta(B, T, KV_HEADS, HEAD_DIM, dtype=dt, grad=True).transpose(1, 2)
            qo, ko = RP.apply_rotary_qk_triton(q, k, meta(B, T, HEAD_DIM, dtype=dt), meta(B, T, HEAD_DIM, dtype=dt))
            torch.autograd.backward([qo, ko], [torch.empty_like(qo), torch.empty_like(ko)])
        out.append((f"{name} rope", rope, True))

        def swiglu(dt=dt):
            g, u = meta(TOKENS, INTERMEDIATE, dtype=dt, grad=True), meta(TOKENS, INTERMEDIATE, dtype=dt, grad=True)
            y = SG.swiglu_triton(g, u)
            y.backward(torch.empty_like(y))
        out.append((f"{name} swiglu", swiglu, True))
    return out


def _footprint(config) -> int:
    """Shared-memory size of a config, up to the element size: every block side times the pipeline stages."""
    return math.prod(v for k, v in config.kwargs.items() if k.startswith("BLOCK_")) * (config.num_stages or 1)


def _tile_per_thread(config) -> float:
    """Output tile elements per thread (the fp32 accumulator's registers): the non-reduction blocks over the threads."""
    tile = math.prod(v for k, v in config.kwargs.items() if k.startswith("BLOCK_") and k not in ("BLOCK_K", "BLOCK_Q"))
    return tile / (32 * (config.num_warps or 4))


def configs_to_compile(launch: Launch, all_configs: bool) -> list:
    """The configs compiled for a launch: its own (None) if not autotuned; else the smallest kept, the largest and the
    one with the most accumulator per thread (only the smallest where the scenario says so; every kept config with
    all_configs)."""
    if not launch.kept:
        return [None]
    if all_configs:
        return list(launch.kept)
    if not launch.largest:
        return [min(launch.kept, key=_footprint)]
    picks = [min(launch.kept, key=_footprint), max(launch.kept, key=_footprint),
             max(launch.kept, key=lambda c: (_tile_per_thread(c), _footprint(c)))]
    return [c for i, c in enumerate(picks) if c not in picks[:i]]


_PTXAS = {"registers": re.compile(r"Used (\d+) registers"), "spill_stores": re.compile(r"(\d+) bytes spill stores"),
          "spill_loads": re.compile(r"(\d+) bytes spill loads")}


def _flags(launch: Launch) -> str:
    keep = ("HAS_", "BACKWARD", "INPUT_PRECISION", "BLOCK_R")
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(launch.constexprs.items())
                    if k.startswith(keep))


def _config_text(config, options: dict) -> str:
    if config is None:
        blocks = ""
        warps, stages = options.get("num_warps", 4), options.get("num_stages", 3)
    else:
        blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK_")) + " "
        warps, stages = config.num_warps, config.num_stages
    return f"{blocks}w{warps} s{stages}"


def compile_launch(launch: Launch, config, gpu: Gpu, seen: dict) -> dict:
    """Compile one launch with one config; a record of what the compiler said."""
    import triton

    kwargs = dict(launch.constexprs, **(config.all_kwargs() if config is not None else launch.options))
    kernel = launch.kernel
    rec = {"arch": gpu.arch, "kernel": kernel.__name__, "site": launch.site, "scenario": launch.scenario,
           "flags": _flags(launch), "config": _config_text(config, launch.options), "configs_kept": len(launch.kept),
           "configs_declared": launch.declared}
    log = io.StringIO()
    started = time.perf_counter()
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed on stdout
    try:
        with contextlib.redirect_stdout(log):
            compiled = kernel.warmup(*launch.args, grid=(1,), **kwargs)
    except Exception as e:  # noqa: BLE001 -- a compile error is a result
        rec.update(status="error", error=f"{type(e).__name__}: {e}"[:3000])
        return rec
    finally:
        triton.knobs.nvidia.dump_ptxas_log = False
    md = compiled.metadata
    text = log.getvalue()
    report = {k: max(int(v) for v in rx.findall(text)) for k, rx in _PTXAS.items() if rx.findall(text)}
    if md.hash in seen:  # compiled before in this run: Triton's cache answered and ptxas did not run
        report = seen[md.hash]
    else:
        seen[md.hash] = report
        rec["compile_s"] = round(time.perf_counter() - started, 2)
    registers = report.get("registers", 0)
    register_file = math.ceil(registers * 32 / 256) * 256 * md.num_warps
    rec.update(status="ok", shared=md.shared, num_warps=md.num_warps, num_stages=md.num_stages, **report,
               binary=md.hash[:16],
               fits=md.shared <= gpu.smem_optin and register_file <= REGISTERS_PER_BLOCK)
    return rec


def worker(arch: int, dtypes: list[str], all_configs: bool, only: str | None, out_path: str) -> None:
    """Enumerate and compile every launch for one architecture; one JSON line per compile into out_path."""
    import triton
    from triton.runtime.driver import driver

    from lora_mem.kernels._common import interpreting

    if interpreting():
        raise SystemExit("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled")
    gpu = GPUS[arch]
    driver.set_active(StandInDriver(gpu))
    recorder = Recorder()
    for name, fn, largest in scenarios(dtypes):
        if only and not re.search(only, name):
            continue
        with recorder.scenario_of(name, largest):
            fn()
    # Coverage is judged on a full run: tf32 alone launches only the LoRA kernels (the others have no dot).
    full = not only and set(dtypes) - {"tf32"}
    launched = {launch.kernel for launch in recorder.launches} if full else set(recorder.kernels)
    seen: dict = {}
    with open(out_path, "w") as out:
        for kernel in recorder.kernels:
            if kernel not in launched:
                out.write(json.dumps({"arch": arch, "kernel": kernel.__name__, "status": "not launched"}) + "\n")
        for launch in recorder.launches:
            for config in configs_to_compile(launch, all_configs):
                rec = compile_launch(launch, config, gpu, seen)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                print(f"[sm_{arch}] {rec['status']:5} {rec['kernel']:28} {rec['scenario']:30} {rec['config']:22} "
                      f"{rec.get('shared', '-'):>7} B {rec.get('registers', '-'):>4} regs "
                      f"{rec.get('spill_stores', 0):>6} spill", file=sys.stderr, flush=True)
    del triton


# ---------------------------------------------------------------------------------------------------------------------
# Parent: one worker per architecture, then the verdict
# ---------------------------------------------------------------------------------------------------------------------


def problems(records: list[dict]) -> list[str]:
    """What fails the check, one line each."""
    out = []
    sites: dict[tuple, list[dict]] = {}
    for r in records:
        where = f"sm_{r['arch']} {r['kernel']}"
        if r["status"] == "not launched":
            out.append(f"{where}: no scenario launches this kernel (add one to bench/perf/compile_check.py)")
            continue
        where += f" [{r['scenario']}] {r['site']} {r['flags']} {r['config']}"
        sites.setdefault((r["arch"], r["scenario"], r["site"], r["flags"]), []).append(r)
        if r["status"] != "ok":
            out.append(f"{where}: compile error: {r['error'].splitlines()[0] if r['error'] else ''}")
            continue
        if not r["fits"]:
            out.append(f"{where}: kept but does not fit ({r['shared']} B shared memory, {r.get('registers')} "
                       f"registers x {r['num_warps']} warps; limit {GPUS[r['arch']].smem_optin} B)")
        if r.get("spill_stores", 0) > SPILL_LIMIT_BYTES:
            out.append(f"{where}: spills {r['spill_stores']} B per thread (limit {SPILL_LIMIT_BYTES})")
    for (arch, scenario, site, flags), rs in sites.items():
        if not any(r["status"] == "ok" and r["fits"] for r in rs):
            out.append(f"sm_{arch} [{scenario}] {site} {flags}: no config that fits")
    return out


def run_workers(archs: list[int], dtypes: list[str], all_configs: bool, only: str | None, jobs: int,
                verbose: bool) -> list[dict]:
    """One worker process per architecture (at most `jobs` at once), each with its own fresh Triton cache."""
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lora-mem-compile-") as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        pending, running = list(archs), []
        while pending or running:
            while pending and len(running) < jobs:
                arch = pending.pop(0)
                out_path = os.path.join(tmp, f"sm_{arch}.jsonl")
                cmd = [sys.executable, "-m", "bench.perf.compile_check", "--worker", str(arch),
                       "--dtypes", ",".join(dtypes), "--worker-out", out_path]
                cmd += (["--all-configs"] if all_configs else []) + (["--only", only] if only else [])
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stderr=None if verbose else subprocess.PIPE, text=True,
                                        env={**env, "TRITON_CACHE_DIR": os.path.join(tmp, f"cache_{arch}")})
                running.append((arch, out_path, proc, time.perf_counter()))
            arch, out_path, proc, started = running.pop(0)
            _, err = proc.communicate()
            got = [json.loads(line) for line in open(out_path)] if os.path.exists(out_path) else []
            if proc.returncode != 0:
                tail = (err or "").strip().splitlines()[-3:]
                got.append({"arch": arch, "kernel": "?", "scenario": "worker", "site": "", "flags": "", "config": "",
                            "status": "error", "error": f"worker exited {proc.returncode}: {' | '.join(tail)}"})
            print(f"sm_{arch} ({GPUS[arch].name}): {len(got)} compiles in {time.perf_counter() - started:.0f} s",
                  flush=True)
            records += got
    return records


def summary(records: list[dict]) -> str:
    lines = [f"{'kernel':28} {'scenario':30} {'site':38} {'config':22} {'arch':>5} {'smem B':>7} {'regs':>4} "
             f"{'spill':>5}"]
    for r in sorted((r for r in records if r["status"] == "ok"),
                    key=lambda r: (r["kernel"], r["scenario"], r["site"], r["config"], r["arch"])):
        mark = "" if r["fits"] else " !"
        lines.append(f"{r['kernel'][:28]:28} {r['scenario'][:30]:30} {r['site'][:38]:38} {r['config']:22} "
                     f"{r['arch']:>5} {r['shared']:>7} {r.get('registers', 0):>4} {r.get('spill_stores', 0):>5}{mark}")
    return "\n".join(lines)


def choice_list(allowed, kind=str):
    """A comma-separated list of values out of `allowed`, at least one."""
    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"must be a comma-separated list out of {', '.join(map(str, allowed))}, "
                                             f"got {text!r}")
        return values
    return parse


def regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"must be a regular expression, got {text!r} ({e})") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    from lora_mem.cli import Parser

    ap = Parser(prog="python -m bench.perf.compile_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", type=choice_list(sorted(GPUS), int), default=list(GPUS),
                    help="compute capabilities to compile for, out of 90 (H100) and 80 (A100) (default: both)")
    ap.add_argument("--dtypes", type=choice_list(DTYPES), default=list(DTYPES),
                    help="activation dtypes, out of bf16, fp16, fp32 and tf32 (fp32 with the kernels' TF32 switch on) "
                         "(default: all)")
    ap.add_argument("--all-configs", action="store_true",
                    help="compile every config each autotuned launch keeps (default: the smallest and the largest)")
    ap.add_argument("--only", type=regex, default=None,
                    help="only the scenarios whose name matches this regular expression, e.g. 'fp32 lora'")
    ap.add_argument("--jobs", type=int, default=2, choices=[1, 2],
                    help="architectures compiled at once, one process each (default 2)")
    ap.add_argument("--json", type=Path, default=None, help="write every compile's record here")
    ap.add_argument("--verbose", action="store_true", help="print each compile as it finishes")
    ap.add_argument("--worker", type=int, choices=sorted(GPUS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.dtypes, args.all_configs, args.only, args.worker_out)
        return 0
    started, load_at_start = time.perf_counter(), os.getloadavg()
    records = run_workers(args.archs, args.dtypes, args.all_configs, args.only, args.jobs, args.verbose)
    print(summary(records))
    found = problems(records)
    elapsed = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    if args.json:
        from bench.common import atomic_write_json, run_info

        import torch
        atomic_write_json(args.json, {
            **run_info(torch.device("cpu")), "loadavg_start": load_at_start,
            "what": "every Triton kernel of lora_mem compiled for a stand-in GPU target (no GPU touched): shared "
                    "memory from the compiled metadata, registers and spill stores (bytes per thread) from ptxas -v",
            "gpus": {a: vars(GPUS[a]) for a in args.archs}, "dtypes": args.dtypes, "all_configs": args.all_configs,
            "spill_limit_bytes": SPILL_LIMIT_BYTES, "elapsed_s": round(elapsed, 1),
            # the workers' CPU time, and the machine's load over the run (other work shares its cores)
            "workers_cpu_s": round(children.ru_utime + children.ru_stime, 1), "loadavg_end": os.getloadavg(),
            "compiles": len(records), "distinct_binaries": len({(r["arch"], r.get("binary")) for r in records}),
            "problems": found, "records": records})
    print(f"\n{len(records)} compiles, {len(found)} problems, {elapsed:.0f} s")
    for line in found:
        print(f"FAIL {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
