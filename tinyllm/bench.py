"""Training throughput benchmark: the real loop (`fit`) on random packed tokens, timed.

    tinyllm bench train --models 768x8,512x8 --compile off,on --out reports/bench
    torchrun --nproc_per_node 2 -m tinyllm.cli bench train --models 768x8 --strategy ddp,zero2

Each run does `warmup` steps (compilation, allocator warm-up), then `steps` timed steps, and
reports useful tokens/s (every token of a packed batch is useful), MFU (on active parameters for
an MoE), step time and peak GPU memory, the largest over the processes: of the timed steps alone
(steps_mem_GiB) and of the whole run, engine set-up and teardown included (peak_mem_GiB). Under torchrun the
batch size is global (each process takes its share) and tokens/s counts all processes. The table
is printed and written as markdown + JSON by rank 0. Runs without dvc installed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from tinyllm.config import DistributedConfig, ModelConfig, MoEConfig, RuntimeConfig, TrainConfig
from tinyllm.data.tokens import PackedBatches, TokenStream
from tinyllm.model.transformer import Transformer
from tinyllm.train.distributed import Dist, TrainingRun, close_distributed, init_distributed
from tinyllm.train.loop import fit
from tinyllm.train.objectives import NextTokenLoss
from tinyllm.train.runtime import device_name, resolve_device, resolve_dtype

# Shapes the project compares against (issue "GPU performance"): dim x layers.
PRESETS = {
    "tiny": dict(dim=192, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=512),
    # the default pipeline model as an MoE with the same active FFN width (2 shared + top-2 of 8, 128 wide)
    "tinymoe": dict(dim=192, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=512,
                    moe=MoEConfig(enabled=True, n_routed_experts=8, n_shared_experts=2, top_k=2,
                                  expert_hidden_dim=128, first_dense_layers=1)),
    "512x8": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, hidden_dim=1408),
    "768x8": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=2048),
    "768x16": dict(dim=768, n_layers=16, n_heads=12, n_kv_heads=4, hidden_dim=2048),
    # MoE (issue "MoE"): MiniMind's shape (4 experts of full width, top-1, no shared expert) ...
    "moe768x8": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=2048,
                     moe=MoEConfig(enabled=True, n_routed_experts=4, n_shared_experts=0, top_k=1,
                                   expert_hidden_dim=2048, first_dense_layers=0)),
    # ... a DeepSeek-style one (8 fine-grained experts of width 512, top-2, 1 shared: 3 × 512 active) ...
    "ds768x8": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=2048,
                    moe=MoEConfig(enabled=True, n_routed_experts=8, n_shared_experts=1, top_k=2,
                                  expert_hidden_dim=512, first_dense_layers=0)),
    # ... and the dense model with the same active parameters per token.
    "768x8h1536": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1536),
    # large enough for ZeRO's memory savings to matter (issue "Distributed"): 0.41B and 0.92B parameters
    "1536x16": dict(dim=1536, n_layers=16, n_heads=12, n_kv_heads=4, hidden_dim=4096),
    "2048x20": dict(dim=2048, n_layers=20, n_heads=16, n_kv_heads=4, hidden_dim=5632),
}
STRATEGIES = {"ddp": DistributedConfig(strategy="ddp"), **{
    f"zero{stage}": DistributedConfig(strategy="deepspeed", zero_stage=stage) for stage in (1, 2, 3)}}


def random_batches(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0):
    """Endless batches of uniform random tokens (throughput does not depend on the values)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        rows = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
        yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def profiled(batches, prof) -> Iterator[dict]:
    """The same batches, marking a profiler step before each one (one batch is one optimizer step
    in the benchmark), so the profiler's schedule follows the real loop without hooks in it."""
    for batch in batches:
        prof.step()
        yield batch


def watch_memory(batches, device: torch.device, skip: int, peaks: dict) -> Iterator[dict]:
    """The same batches; from batch `skip` on, tracks the GPU allocator's peak of the training steps
    alone (peaks["steps"]), apart from the engine's build-up and teardown (peaks["run"] covers all).
    The peak is read as each batch is fetched, so the last step is not in it (steps are alike)."""
    for index, batch in enumerate(batches):
        if index == skip:
            peaks["run"] = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        elif index > skip:
            peaks["steps"] = torch.cuda.max_memory_allocated(device)  # the steps so far (a host-side counter)
        yield batch


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def trace_summary(trace: dict) -> dict:
    """Per step, from a chrome trace of the profiled steps: wall time (the CPU's step markers), time
    the GPU was busy, compute and NCCL kernel time, how much of NCCL's time no compute kernel hid,
    and GPU operations (kernels, memsets, copies) per step."""
    events = trace["traceEvents"]
    steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#")]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    nccl = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" in e["name"].lower()]
    compute = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower()]
    n = max(1, len(steps))
    span = (max(b for _, b in compute + nccl) - min(a for a, _ in compute + nccl)) if kernels else 0.0
    busy, compute_ms = _covered(compute + nccl), _covered(compute)

    def ms(us: float) -> float:
        return round(us / n / 1e3, 2)

    # NCCL time no compute kernel hid = the time the GPU was busy with NCCL alone
    return {"steps": len(steps), "wall_ms": ms(sum(e["dur"] for e in steps)), "gpu_span_ms": ms(span),
            "gpu_busy_ms": ms(busy), "compute_ms": ms(compute_ms), "nccl_ms": ms(_covered(nccl)),
            "nccl_exposed_ms": ms(busy - compute_ms), "gpu_ops": len(kernels) // n}


def start_profiler(out_dir: Path, name: str, rank: int, skip: int, active: int = 5):
    """A torch.profiler over `active` steps after `skip` steps (compilation and warm-up); on exit it
    writes, per process, the gzipped chrome trace (open in https://ui.perfetto.dev), the top
    operators by GPU and by CPU time, and the `trace_summary` line."""
    from torch.profiler import ProfilerActivity, profile, schedule

    def write(prof) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = out_dir / f"{name}_rank{rank}.trace.json"
        prof.export_chrome_trace(str(raw))
        trace = json.loads(raw.read_text())
        with gzip.open(f"{raw}.gz", "wt") as f:
            json.dump(trace, f)
        raw.unlink()
        summary = trace_summary(trace)
        averages = prof.key_averages()
        (out_dir / f"{name}_rank{rank}.txt").write_text(
            json.dumps(summary) + "\n\n"
            + averages.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70) + "\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
        print(f"profile {name} rank {rank}: {json.dumps(summary)}", flush=True)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    # the profiler's step n is training step n-1 (`profiled` marks a step as each batch is fetched),
    # so wait=skip-1 makes the active steps the first `active` ones after `skip`; repeat=1: once only
    return profile(activities=activities, schedule=schedule(wait=skip - 1, warmup=2, active=active, repeat=1),
                   on_trace_ready=write)


def bench_train(preset: str, *, seq_len: int, batch_size: int, vocab_size: int, steps: int, warmup: int,
                compile: bool | str, device: str, dtype: str, tokens: Path | None = None, strategy: str = "ddp",
                dist: Dist | None = None, profile_dir: Path | None = None, log_interval: int = 10,
                threads: int | str = "auto") -> dict:
    """One timed training run; returns a table row (and the loss curve, kept out of the table).

    compile: `runtime.compile` (true, false or a mode of config.COMPILE_MODES).

    tokens: the pipeline's token folder (artifacts/tokens) to train on instead of random tokens;
    the vocabulary then comes from its index.
    strategy: a key of STRATEGIES (ddp also means a single plain process).
    profile_dir: also profile the first 5 timed steps (`start_profiler`) and write the results here.
        Writing the trace happens inside a timed window, so a profiled run's tokens/s is not comparable.
    log_interval: steps per log point; each one reads the loss, a host sync (warmup and steps are
    rounded up to a multiple of it).
    threads: `runtime.threads` on a CPU (auto, follow or a number).
    """
    dist = dist or Dist()
    rows_per_rank = batch_size // dist.world_size
    warmup, steps = -(-warmup // log_interval) * log_interval, -(-steps // log_interval) * log_interval
    if profile_dir is not None and (log_interval < 6 or steps < 6):
        raise ValueError("--profile needs --log-interval >= 6 and --steps >= 6, so that the 5 profiled steps "
                         "hold no log point (its host sync) and end before the run")
    if tokens is not None:
        stream = TokenStream(tokens, "train")
        vocab_size = stream.index["vocab_size"]
        batches = PackedBatches(stream, rows_per_rank, seq_len, seed=0, rank=dist.rank, world_size=dist.world_size)
    else:
        batches = random_batches(vocab_size, rows_per_rank, seq_len, seed=dist.rank)
    model_cfg = ModelConfig(**PRESETS[preset], max_seq_len=seq_len, vocab_size=vocab_size)
    runtime = RuntimeConfig(device=device, dtype=dtype, compile=compile, threads=threads)
    train_cfg = TrainConfig(max_steps=warmup + steps, batch_size=batch_size, warmup_steps=1, lr=3e-4, min_lr=3e-5,
                            log_interval=log_interval, eval_interval=10**9)
    dev = resolve_device(runtime, dist)
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    if dev.type == "cuda":
        dev = torch.device("cuda", 0 if dev.index is None else dev.index)  # "--device cuda" names no index
        torch.cuda.set_device(dev)  # also initialises CUDA, which the memory counters need
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    run = TrainingRun(dist=dist, distributed=STRATEGIES[strategy])
    peaks = {"run": 0, "steps": 0}
    if dev.type == "cuda":
        batches = watch_memory(batches, dev, warmup, peaks)
    with contextlib.ExitStack() as stack:
        if profile_dir is not None:
            suffix = "" if not compile else "_compiled" if compile is True else f"_{compile}"
            name = f"{preset}_{strategy}_{dist.world_size}x_b{batch_size}{suffix}"
            prof = stack.enter_context(start_profiler(profile_dir, name, dist.rank, skip=warmup))
            batches = profiled(batches, prof)
        result = fit(model, NextTokenLoss(), batches, train_cfg, runtime, run=run,
                     flops_per_token=model.flops_per_token(seq_len))
    if dev.type == "cuda":
        peaks["run"] = max(peaks["run"], torch.cuda.max_memory_allocated(dev))
    peak = torch.tensor([float(peaks["run"]), float(peaks["steps"])], device=dev)
    if dist.enabled:
        torch.distributed.all_reduce(peak, torch.distributed.ReduceOp.MAX)
    peak_run, peak_steps = (round(v / 2**30, 2) if dev.type == "cuda" else None for v in peak.tolist())
    timed = [h for h in result.history if h["step"] > warmup]
    tokens_per_sec = sum(h["tokens_per_sec"] for h in timed) / len(timed)
    mfu = sum(h.get("mfu", 0.0) for h in timed) / len(timed)
    return {
        "model": preset,
        "gpus" if dev.type == "cuda" else "procs": dist.world_size,
        "strategy": strategy,
        "params_M": round(model.num_params() / 1e6, 1),
        "active_M": round(model.num_params(active=True) / 1e6, 1),
        "seq": seq_len,
        "batch": batch_size,
        "dtype": dtype,
        "compile": compile,
        "tokens_per_sec": round(tokens_per_sec),
        "mfu": round(mfu, 4) if mfu else None,
        "step_ms": round(1000 * batch_size * seq_len / tokens_per_sec, 1),
        "steps_mem_GiB": peak_steps,
        "peak_mem_GiB": peak_run,
        "final_loss": round(result.final["train/loss"], 4),
        "loss_curve": [(h["step"], round(h["train/loss"], 4)) for h in result.history],
    }


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_infer(preset: str, *, batch_size: int, prompt_len: int, new_tokens: int, vocab_size: int,
                device: str, dtype: str, repeats: int = 3) -> dict:
    """Generation speed of the real engine (`generate_batch`, KV cache, greedy, no stop token):
    time to first token (prefill + one token) and decode tokens/s, per sequence and for the batch.
    The fastest of `repeats` runs counts (after one warm-up)."""
    from tinyllm.infer.generate import generate_batch

    runtime = RuntimeConfig(device=device, dtype=dtype)
    dev = resolve_device(runtime)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS[preset], max_seq_len=prompt_len + new_tokens, vocab_size=vocab_size))
    model = model.to(dev, dtype=resolve_dtype(runtime, dev)).eval()
    prompts = torch.randint(0, vocab_size, (batch_size, prompt_len)).tolist()

    def run(n: int):
        return lambda: generate_batch(model, prompts, max_new_tokens=n)

    run(new_tokens)()  # warm-up: allocator, kernels
    first = min(_timed(run(1), dev) for _ in range(repeats))
    whole = min(_timed(run(new_tokens), dev) for _ in range(repeats))
    decode = max(whole - first, 1e-9) / (new_tokens - 1)  # seconds per decode step
    return {
        "model": preset,
        "params_M": round(model.num_params() / 1e6, 1),
        "dtype": str(resolve_dtype(runtime, dev)).removeprefix("torch."),
        "batch": batch_size,
        "prompt": prompt_len,
        "new_tokens": new_tokens,
        "ttft_ms": round(first * 1e3, 2),
        "decode_ms_per_token": round(decode * 1e3, 3),
        "decode_tokens_per_sec_per_seq": round(1 / decode),
        "decode_tokens_per_sec_total": round(batch_size / decode),
    }


def run_infer(models: list[str], batch_sizes: list[int], out_dir: Path, name: str = "infer", **kwargs) -> str:
    """Benchmark generation for every model × batch size and write one table."""
    rows = [bench_infer(m, batch_size=b, **kwargs) for m in models for b in batch_sizes]
    return write_table(rows, out_dir, name, resolve_device(RuntimeConfig(device=kwargs["device"])),
                       title="Generation speed")


def bench_serve(checkpoint: str | None, *, preset: str | None, clients: list[int], requests: int, max_tokens: int,
                device: str, slots: list[int], log_dir: Path, dtype: str = "auto", invariant: bool = False
                ) -> tuple[list[dict], str]:
    """`tinyllm serve` in a process of its own, once per `slots` setting (1 = one request at a time,
    as the server was before continuous batching), driven by streaming clients (the official openai
    client, one process each): for each number of concurrent clients, aggregate completion tokens/s
    and time-to-first-token / latency percentiles. Every reply runs to max_tokens (ignore_eos), so
    all rows generate the same work. Also checks that greedy and seeded replies to max(clients)
    concurrent requests equal their solo replies. `preset` serves random weights of that shape (with the
    checkpoint's tokenizer) instead of the checkpoint's; `dtype` is the server's `--dtype`, `invariant`
    its `--batch-invariant`."""
    import multiprocessing
    import tempfile

    from tinyllm.infer.chat import chat_checkpoint
    from tinyllm.serve import loadgen

    source = chat_checkpoint(Path(checkpoint) if checkpoint else None)  # named here, not in the server's log
    rows, most = [], max(clients)
    with tempfile.TemporaryDirectory() as tmp, multiprocessing.get_context("spawn").Pool(most) as pool:
        target = _random_checkpoint(preset, source, Path(tmp)) if preset else source
        pool.map(loadgen.ready, range(most), chunksize=1)
        for n_slots in slots:
            log = log_dir / f"serve_slots{n_slots}.log"
            with _served_process(target, device, dtype, n_slots, log, invariant) as (url, name):
                warm_up = [(url, name, i, 1, max_tokens, 0) for i in range(most)]
                pool.map(loadgen.client, warm_up, chunksize=1)
                for n_clients in clients:
                    start_at = time.time() + 0.5
                    results = [r for rs in pool.map(loadgen.client, [(url, name, i, requests, max_tokens, start_at)
                                                                      for i in range(n_clients)], chunksize=1)
                               for r in rs]
                    rows.append(_serve_row(preset or str(source), n_slots, invariant, n_clients, results))
                if n_slots == max(slots):
                    check = " ".join(_alone_and_together(pool, url, name, most, max_tokens, n_slots, seeded)
                                     for seeded in (False, True))
    return rows, check


def _alone_and_together(pool, url: str, name: str, most: int, max_tokens: int, n_slots: int, seeded: bool) -> str:
    """`most` requests (greedy, or seeded at temperature 0.8) sent one at a time, then all at once:
    how many replies are the same both ways, and where the others part."""
    from tinyllm.serve import loadgen

    asks = [(url, name, q, max_tokens, i if seeded else None) for i, q in enumerate(loadgen.numbered_questions(most))]
    solo = [loadgen.reply_steps(a) for a in asks]
    together = pool.map(loadgen.reply_steps, asks, chunksize=1)
    differ = [loadgen.parting(a, b) for (text_a, a), (text_b, b) in zip(solo, together) if text_a != text_b]
    kind = "Seeded replies (temperature 0.8)" if seeded else "Greedy replies"
    check = (f"{kind} to {most} concurrent requests equal to their solo replies ({n_slots} slots): "
             f"{most - len(differ)}/{most}.")
    if differ:
        check += " Where the others part: " + ", ".join(_where(p, seeded) for p in differ) + "."
    return check


def _where(parting: tuple[int, float] | None, seeded: bool) -> str:
    """A reply's parting from its solo run, in words; a greedy one with the solo run's margin there."""
    if parting is None:
        return "one ends sooner"
    token, margin = parting
    return f"at token #{token}" + ("" if seeded else f" (the solo run's two best {margin:.3f} apart in log-prob)")


def _serve_row(model: str, n_slots: int, invariant: bool, n_clients: int, results: list[dict]) -> dict:
    def pct(key, q):
        ordered = sorted(r[key] for r in results)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 1)

    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    server = ("one at a time" if n_slots == 1 else f"batched, {n_slots} slots") + (", invariant" if invariant else "")
    return {"model": model, "server": server,
            "clients": n_clients, "requests": len(results),
            "completion_tokens_per_sec": round(sum(r["tokens"] for r in results) / wall, 1),
            "ttft_p50_ms": pct("ttft", 0.5), "ttft_p90_ms": pct("ttft", 0.9), "ttft_p99_ms": pct("ttft", 0.99),
            "latency_p50_ms": pct("latency", 0.5), "latency_p99_ms": pct("latency", 0.99)}


def _random_checkpoint(preset: str, source: Path, folder: Path) -> Path:
    """A checkpoint of random weights in a preset's shape, with `source`'s tokenizer."""
    from tinyllm.train.checkpoint import read_config, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(**PRESETS[preset], max_seq_len=512, vocab_size=read_config(source)["model"]["vocab_size"])
    save_checkpoint(Transformer(cfg), folder / preset, tokenizer_dir=source)
    return folder / preset


@contextlib.contextmanager
def _served_process(checkpoint: Path, device: str, dtype: str, slots: int, log: Path, invariant: bool,
                    timeout: float = 600):
    """`tinyllm serve` on a free 127.0.0.1 port until the block ends: yields (base url, model name)."""
    import subprocess
    import sys
    import urllib.request

    from tinyllm.serve.background import free_port

    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "tinyllm.cli", "serve", str(checkpoint), "--port", str(port),
                                   "--device", device, "--dtype", dtype, "--slots", str(slots), "--max-queue", "1024",
                                   *(["--batch-invariant"] if invariant else [])],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the server did not start; see {log}") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", health["models"][0]
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_serve(checkpoint: str | None, out_dir: Path, **kwargs) -> str:
    rows, check = bench_serve(checkpoint, log_dir=out_dir, **kwargs)
    return write_table(rows, out_dir, f"serve_{kwargs['preset'] or 'checkpoint'}",
                       resolve_device(RuntimeConfig(device=kwargs["device"])), title="API under load",
                       note=f"{check} Server weights: --dtype {kwargs.get('dtype', 'auto')}"
                            f"{' --batch-invariant' if kwargs.get('invariant') else ''}.")


def write_table(rows: list[dict], out_dir: Path, name: str, device: torch.device,
                title: str = "Training throughput", note: str = "") -> str:
    """Print-ready markdown table with the machine in the heading; also saved as .md and .json."""
    card = device_name(device)
    header = (f"# {title} — {card}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}, {platform.node() or 'host'}\n\n")
    cols = [c for c in rows[0] if c != "loss_curve"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    table = header + "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = card.replace(" ", "_").replace("/", "_")
    (out_dir / f"{name}_{slug}.md").write_text(table)
    (out_dir / f"{name}_{slug}.json").write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows,
                                                             **({"note": note} if note else {})}, indent=2))
    return table


def run(models: list[str], compiles: list[bool | str], out_dir: Path, strategies: tuple[str, ...] = ("ddp",),
        name: str = "train", **kwargs) -> str:
    """Benchmark every model × strategy × compile setting and write one table (rank 0)."""
    dist = init_distributed()
    try:
        rows = [bench_train(m, compile=c, strategy=s, dist=dist, **kwargs)
                for m in models for s in strategies for c in compiles]
    finally:
        close_distributed()
    if not dist.is_main:
        return ""
    return write_table(rows, out_dir, name, resolve_device(RuntimeConfig(device=kwargs["device"]), dist))
