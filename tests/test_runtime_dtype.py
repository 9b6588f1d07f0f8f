"""runtime.dtype auto: bf16 where the hardware multiplies bf16 faster than fp32, float32 elsewhere."""

import pytest
import torch

from tinyllm.config import RuntimeConfig
from tinyllm.errors import ConfigError
from tinyllm.train import runtime
from tinyllm.train.distributed import Dist
from tinyllm.train.runtime import resolve_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bf16_on_cuda_and_on_a_cpu_where_bf16_is_faster(monkeypatch):
    assert resolve_dtype(RuntimeConfig(), CUDA) == torch.bfloat16
    assert resolve_dtype(RuntimeConfig(), CPU) == torch.float32  # conftest: a CPU where it is not
    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda: True)
    assert resolve_dtype(RuntimeConfig(), CPU) == torch.bfloat16
    assert resolve_dtype(RuntimeConfig(dtype="float32"), CPU) == torch.float32  # asked for: kept
    assert resolve_dtype(RuntimeConfig(dtype="bfloat16"), CUDA) == torch.bfloat16


def test_the_cpu_check_reads_the_instruction_flags(monkeypatch, tmp_path):
    monkeypatch.undo()  # conftest's stand-in
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    for text, native in [("flags\t\t: fpu sse avx2 avx512f avx512bw", False),  # bf16 would be emulated
                         ("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni", True),
                         ("flags\t\t: fpu amx_bf16 amx_tile", True),
                         (None, False)]:  # not Linux
        if text is None:
            cpuinfo.unlink()
        else:
            cpuinfo.write_text(text + "\n")
        runtime.cpu_multiplies_bf16.cache_clear()
        assert runtime.cpu_multiplies_bf16() is native, text
    runtime.cpu_multiplies_bf16.cache_clear()


@pytest.mark.parametrize(("flags", "speedup", "picked"), [
    (True, 2.2, True),    # the AVX512-BF16 VM of 2026-12-04
    (True, 0.55, False),  # the AVX512-BF16 VM of 2026-12-07: same flags, half fp32's speed
    (True, 1.05, False),  # under the margin
    (False, None, False),  # no instructions: not even measured
])
def test_the_cpu_pick_needs_the_instructions_and_the_speed(monkeypatch, flags, speedup, picked):
    monkeypatch.undo()  # conftest's stand-in
    monkeypatch.setattr(runtime, "cpu_multiplies_bf16", lambda: flags)
    measured = []
    monkeypatch.setattr(runtime, "bf16_matmul_speedup", lambda: measured.append(1) or speedup)
    runtime.cpu_bf16_is_faster.cache_clear()
    try:
        assert runtime.cpu_bf16_is_faster() is picked
        assert runtime.cpu_bf16_is_faster() is picked and len(measured) == (1 if flags else 0)  # once a process
    finally:
        runtime.cpu_bf16_is_faster.cache_clear()


def test_the_speed_check_draws_no_random_numbers_and_keeps_the_thread_count():
    """It runs in every CPU stage before its data order and other draws: a draw here would move them. It
    measures on one thread; the stage's own count (which changes the weights too) comes back."""
    torch.manual_seed(0)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    speedup = runtime.bf16_matmul_speedup(rounds=2, matmuls=1)
    assert speedup > 0 and speedup != float("inf")
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads


def test_one_named_gpu_for_several_processes_is_refused():
    """runtime.device: cuda:1 under torchrun used to put every process on GPU 1."""
    with pytest.raises(ConfigError, match="runtime.device='cuda:1' names one GPU, but 2 processes"):
        runtime.resolve_device(RuntimeConfig(device="cuda:1"), Dist(rank=1, world_size=2, local_rank=1))


def test_cuda_under_torchrun_on_a_machine_without_it_is_named():
    """Under torchrun, runtime.device: cuda used to fall back to the CPU without a word."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="runtime.device='cuda' but this machine has no CUDA GPU"):
        runtime.resolve_device(RuntimeConfig(device="cuda"), Dist(rank=0, world_size=2, local_rank=0))
