"""The Triton kernels compiled for real GPUs without one (bench/perf/compile_check.py), the config pruning per dtype
and target it checks, and the autotune choices kept across processes (Triton's cache_results)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench.perf.compile_check import GPUS, StandInDriver

REPO = Path(__file__).resolve().parent.parent

triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
needs_ptxas = pytest.mark.skipif(not PTXAS.is_file(), reason="the triton wheel has no bundled ptxas")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter at the repository root, without TRITON_INTERPRET (the kernels must be JIT
    functions, as on a GPU)."""
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          env={**base, **env}, timeout=600)


# ---------------------------------------------------------------------------------------------------------------------
# The compile check itself: what CI runs
# ---------------------------------------------------------------------------------------------------------------------


@needs_ptxas
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    """Every kernel x dtype x launch site, its smallest and largest kept configs, compiled to cubins for H100 and A100:
    no compile error, every launch site has a config that fits, no kept config over shared memory, no spills."""
    out = tmp_path / "compile.json"
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.perf.compile_check", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, env=base, timeout=1200)
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0, "\n".join(failures) or proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["problems"] == [] and set(result["gpus"]) == {"90", "80"}
    kernels = {r["kernel"] for r in result["records"]}
    assert {"_fused_lora_matmul_kernel", "_thin_matmul_kernel", "_multi_lora_matmul_kernel", "_multi_shrink_kernel",
            "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel",
            "_swiglu_bwd_kernel"} <= kernels
    scenarios = {r["scenario"].split()[0] for r in result["records"]}
    assert scenarios == {"bf16", "fp16", "fp32", "tf32"}


def test_check_fails_on_what_it_promises_to_catch():
    """The verdict: a compile error, a kept config over shared memory, a spill, a site with nothing that fits, a kernel
    no scenario launches. (A check that cannot fail checks nothing.)"""
    from bench.perf.compile_check import SPILL_LIMIT_BYTES, problems

    site = {"arch": 80, "kernel": "_k", "scenario": "bf16 s", "site": "f y", "flags": "", "config": "64x64 w4 s3"}
    ok = {**site, "status": "ok", "shared": 1024, "num_warps": 4, "registers": 64, "fits": True}
    assert problems([ok]) == []
    too_big = {**ok, "config": "128x256 w8 s3", "shared": GPUS[80].smem_optin + 1, "fits": False}
    found = problems([ok, too_big])
    assert len(found) == 1 and "does not fit" in found[0]
    assert any("no config that fits" in p for p in problems([too_big]))
    spilling = {**ok, "spill_stores": SPILL_LIMIT_BYTES + 4}
    assert any("spills" in p for p in problems([spilling]))
    assert any("compile error" in p for p in problems([{**site, "status": "error", "error": "PTXASError: boom"}]))
    assert any("no scenario" in p for p in problems([{"arch": 90, "kernel": "_new", "status": "not launched"}]))


def test_cli_rejects_bad_options_in_one_line(capsys):
    from bench.perf.compile_check import build_parser

    bad = ((["--archs", "75"], "--archs"), (["--dtypes", "int8"], "--dtypes"), (["--only", "("], "--only"),
           (["--jobs", "3"], "--jobs"))
    for argv, option in bad:
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        assert option in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Config pruning per dtype and target, against a stand-in driver
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stand_in(arch: int):
    """Triton's active driver answers for the GPU `arch` (capability, shared memory, SMs) for the duration."""
    from triton.runtime.driver import driver

    previous = driver._active  # None on a machine without a GPU, where reset_active() would raise
    driver.set_active(StandInDriver(GPUS[arch]))
    try:
        yield GPUS[arch]
    finally:
        driver.set_active(previous)


QWEN_SHAPES = [(1536, 1536), (1536, 256), (1536, 8960), (8960, 1536)]  # (K, N): q/o, k/v, gate/up, down
PRECISIONS = {"bf16": (torch.bfloat16, "tf32"), "fp16": (torch.float16, "tf32"), "fp32": (torch.float32, "ieee"),
              "tf32": (torch.float32, "tf32")}


def fused_args(K: int, N: int, dtype, M: int = 8192) -> dict:
    a = torch.empty(M, K, dtype=dtype, device="meta")
    return {"a_ptr": a, "M_BUCKET": M, "N": N, "K": K}


@pytest.mark.parametrize("arch", sorted(GPUS))
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("rank", [8, 16, 64, 128])
@pytest.mark.parametrize("keep", [False, True])
def test_fused_configs_fit_the_target(arch, precision, rank, keep):
    from lora_mem.kernels import lora_linear as L
    from lora_mem.kernels._common import rank_block

    dtype, input_precision = PRECISIONS[precision]
    meta = dict(HAS_KEEP=keep, INPUT_PRECISION=input_precision, BLOCK_R=rank_block(rank), DOT_FP32=False)
    tensor_cores = precision != "fp32"
    with stand_in(arch) as gpu:
        for K, N in QWEN_SHAPES:
            kept = L._fused_configs_for_launch(L._fused_lora_matmul_autotuned.configs, fused_args(K, N, dtype),
                                               **meta)
            assert kept
            pool = L.FUSED_CONFIGS if tensor_cores else L._FUSED_FP32_CONFIGS
            assert all(c in pool for c in kept)  # fp32 at full precision never gets a tensor-core tile
            for c in kept:
                assert L._fused_smem(c, dtype.itemsize, rank_block(rank), keep, tensor_cores) <= gpu.smem_optin
                if keep or arch < 90:
                    assert L.acc_per_thread(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) <= 64


def test_fp32_configs_that_overflowed_are_pruned():
    """The large tensor-core tiles in fp32 take 192-288 KiB: over A100's shared memory, and in TF32 over H100's too."""
    from lora_mem.kernels import lora_linear as L

    big = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in L.FUSED_CONFIGS
           if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 256}
    assert big  # the 128x256 / 256x128 tensor-core tiles exist for 16-bit dtypes
    meta = dict(HAS_KEEP=False, INPUT_PRECISION="tf32", BLOCK_R=16, DOT_FP32=False)
    for arch in GPUS:
        with stand_in(arch):
            tf32 = L._fused_configs_for_launch(L._fused_lora_matmul_autotuned.configs,
                                               fused_args(1536, 8960, torch.float32), **meta)
            bf16 = L._fused_configs_for_launch(L._fused_lora_matmul_autotuned.configs,
                                               fused_args(1536, 8960, torch.bfloat16), **meta)
        shapes = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in tf32}
        assert not shapes & big  # 288 KiB (H100) / 192 KiB (A100) in TF32
        if arch == 90:
            assert len(bf16) == len(L.FUSED_CONFIGS)  # bf16 on H100 keeps every tile


@pytest.mark.parametrize("arch", sorted(GPUS))
@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("rank", [8, 16, 64, 128])
def test_thin_and_multi_configs_fit_the_target(arch, precision, rank):
    from lora_mem.kernels import lora_linear as L
    from lora_mem.kernels import multi_lora_linear as ML
    from lora_mem.kernels._common import rank_block

    dtype, input_precision = PRECISIONS[precision]
    tensor_cores = precision != "fp32"
    block_r = rank_block(rank)
    with stand_in(arch) as gpu:
        for keep in (False, True):
            for P, Q in ((8192, 1536), (1536, 8192), (256, 8192)):  # t / dt; dA, dB (split reduction)
                named = {"x_ptr": torch.empty(P, Q, dtype=dtype, device="meta"), "P_BUCKET": P, "Q_BUCKET": Q}
                kept = L._thin_configs_for_launch(L._thin_matmul_autotuned.configs, named, HAS_KEEP=keep,
                                                  INPUT_PRECISION=input_precision, BLOCK_R=block_r)
                assert kept
                pool = (L._THIN_FP32_CONFIGS if not tensor_cores else
                        L._THIN_KEEP_WIDE_RANK_CONFIGS if keep and block_r >= 64 else L._THIN_CONFIGS)
                assert all(c in pool for c in kept)
                assert all(L._thin_smem(c, dtype.itemsize, block_r, keep, tensor_cores) <= gpu.smem_optin
                           for c in kept)
        for M in (4, 8192):  # decode, prefill
            x = torch.empty(M, 1536, dtype=dtype, device="meta")
            meta = dict(INPUT_PRECISION=input_precision, BLOCK_R=block_r)
            matmul = ML._multi_configs_for_launch(ML._multi_lora_matmul_autotuned.configs,
                                                  {"x_ptr": x, "M_BUCKET": M, "N": 1536, "K": 1536}, **meta)
            shrink = ML._multi_configs_for_launch(ML._multi_shrink_autotuned.configs,
                                                  {"x_ptr": x, "M_BUCKET": M, "K": 1536}, **meta)
            assert matmul and shrink
            fp32_pools = (ML._MULTI_FUSED_FP32_CONFIGS, ML._MULTI_SHRINK_FP32_CONFIGS)
            assert all((c in fp32_pools[0]) != tensor_cores for c in matmul)
            assert all((c in fp32_pools[1]) != tensor_cores for c in shrink)
            if M == 4:
                assert all(c.kwargs["BLOCK_M"] == 16 for c in matmul)


# ---------------------------------------------------------------------------------------------------------------------
# Autotune once: the choice persists across processes
# ---------------------------------------------------------------------------------------------------------------------

AUTOTUNE_PROBE = """
    import json, torch, triton
    from triton.runtime.driver import driver
    from bench.perf.compile_check import GPUS, StandInDriver
    calls = []

    def benchmarker(kernel_call, quantiles=None, **kwargs):  # times nothing; a fixed, distinct time per call
        calls.append(1)
        return [float(10 - len(calls))] * 3

    driver.set_active(StandInDriver(GPUS[90], benchmarker))
    triton.knobs.runtime.jit_cache_hook = lambda *a, **k: True  # no compile, no launch: the choice is what is tested
    from lora_mem.kernels import lora_linear as L

    def meta(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    L._fused_lora_matmul(meta(8192, 1536), meta(1536, 1536).t(), meta(8192, 16), meta(16, 1536))
    tuner = L._fused_lora_matmul_autotuned
    print(json.dumps({"benchmarked": len(calls), "best": str(tuner.best_config)}))
"""


def test_autotune_choice_is_stored_and_reused_by_the_next_process(tmp_path):
    """The first process benchmarks the kept configs and stores the winner in Triton's cache directory; a second
    process with that directory benchmarks nothing and launches the same config; another directory starts over."""
    cache = tmp_path / "triton-cache"

    def probe(cache_dir: Path) -> dict:
        proc = run_python(AUTOTUNE_PROBE, TRITON_CACHE_DIR=str(cache_dir))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = probe(cache)
    assert first["benchmarked"] > 1
    assert list(cache.rglob("*.autotune.json"))
    second = probe(cache)
    assert second == {"benchmarked": 0, "best": first["best"]}
    assert probe(tmp_path / "elsewhere")["benchmarked"] == first["benchmarked"]
