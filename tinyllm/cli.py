"""The `tinyllm` command. Training runs through `dvc repro`; this holds the tools around it.

    tinyllm chat                                   # the pipeline's newest chat model, in the terminal
    tinyllm chat artifacts/sft --adapter artifacts/lora/adapter --temperature 0
    tinyllm serve --port 8000                      # OpenAI-compatible API over the newest chat model
    tinyllm web                                    # Streamlit chat page
    tinyllm export artifacts/dpo hf/tinyllm         # a transformers LlamaForCausalLM folder; `import` reverses it
    tinyllm bench train --models 768x8 --compile off,on --dtype bfloat16
    dvc exp run $(tinyllm preset gpu)              # a named set of params (tinyllm/presets.py)
    python -m tinyllm.cli bench train ...     # same, where the package is not installed
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tinyllm import bench
from tinyllm.config import COMPILE_MODES
from tinyllm.errors import UserError


def _compile_list(text: str) -> list[bool | str]:
    values = {"on": True, "off": False, "true": True, "false": False, **{mode: mode for mode in COMPILE_MODES}}
    try:
        return [values[v.strip().lower()] for v in text.split(",")]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected a comma list of on, off or {', '.join(COMPILE_MODES)}, "
                                         f"got {text!r}") from None


def _checked(convert, ok, rule: str):
    """An argparse type: `convert`, then reject values failing `ok` with "must be <rule>"."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be {rule}")
        return value

    return parse


def _names_from(known: dict, what: str):
    """An argparse type: a comma list of keys of `known`; an unknown one is an error naming the rest."""

    def parse(text: str) -> list[str]:
        names = [m.strip() for m in text.split(",")]
        unknown = [m for m in names if m not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; known: {', '.join(known)}")
        return names

    return parse


def _cpu_threads(text: str) -> int | str:
    """`runtime.threads` on the command line: auto, follow or a number >= 1."""
    if text in ("auto", "follow"):
        return text
    return _checked(int, lambda n: n >= 1, "auto, follow or a number >= 1")(text)


def _model_args(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    """The model-preset flags `bench train` and `bench infer` share."""
    parser.add_argument("--models", type=_names_from(bench.PRESETS, "model preset(s)"), default=["tiny"],
                        help=f"comma list of {', '.join(bench.PRESETS)}")
    parser.add_argument("--vocab-size", type=int, default=6400, help="embedding rows")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help=dtype_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="multi-turn chat in the terminal (/reset clears, /exit quits)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    chat.add_argument("checkpoint", nargs="?", type=Path,
                      help="checkpoint folder; default: the newest of artifacts/grpo, dpo, lora, sft")
    chat.add_argument("--adapter", type=Path,
                      help="a peft adapter folder to apply on top (e.g. artifacts/lora/adapter)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--temperature", type=_checked(float, lambda v: v >= 0, ">= 0"), default=0.7,
                      help="0 is greedy")
    chat.add_argument("--top-p", type=_checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=0.9,
                      help="nucleus sampling mass")
    chat.add_argument("--top-k", type=_checked(int, lambda v: v > 0, "> 0"), default=None,
                      help="sample among the k most likely tokens")
    chat.add_argument("--max-tokens", type=_checked(int, lambda v: v > 0, "> 0"), default=256,
                      help="most tokens per reply (the context window caps it)")
    chat.add_argument("--seed", type=int, default=None, help="seed sampling for repeatable replies")
    chat.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP API (chat/completions, completions, models)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("checkpoints", nargs="*", metavar="[NAME=]CHECKPOINT",
                       help="checkpoint folders to serve (default: the newest of artifacts/grpo, dpo, lora, sft)")
    serve.add_argument("--adapter", type=Path, help="a peft adapter folder on top (one checkpoint only)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    serve.add_argument("--port", type=int, default=8000, help="port")
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 requests")
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="weights dtype; auto is bf16 on CUDA")
    positive = _checked(int, lambda n: n >= 1, "a whole number >= 1")
    serve.add_argument("--slots", type=positive, default=32, help="most requests generated together (1: one at a time)")
    serve.add_argument("--prefill-tokens", type=positive, default=256,
                       help="prompt tokens prefilled per step beside the running batch")
    serve.add_argument("--max-queue", type=_checked(int, lambda n: n >= 0, "a whole number >= 0"), default=64,
                       help="most requests waiting for a slot (more get 503)")
    serve.add_argument("--max-live-tokens", type=positive, default=None,
                       help="most prompt + max_tokens over the requests in slots (default: every slot's context)")
    serve.add_argument("--decode-steps", type=positive, default=None,
                       help="tokens per request per decode launch (default: 8 on CUDA graphs, else 4)")
    serve.add_argument("--threads", type=_checked(int, lambda n: n >= 0, "a whole number >= 0"), default=0,
                       help="torch threads of each engine on a CPU (0: half the cores, leaving the rest to HTTP)")
    serve.add_argument("--batch-invariant", action="store_true",
                       help="replies that do not depend on the requests beside them (greedy and seeded replies equal "
                            "their solo runs, in bf16 on a GPU too); decodes every slot at every step")
    web = sub.add_parser("web", help="Streamlit chat page over the pipeline's checkpoints",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    web.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="where the pipeline's checkpoints are")
    web.add_argument("--host", default="127.0.0.1", help="address to bind")
    web.add_argument("--port", type=int, default=8501, help="port")
    web.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    export = sub.add_parser("export", help="a checkpoint as a Hugging Face transformers folder (LlamaForCausalLM) "
                            "or a GGUF file for llama.cpp and Ollama",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    export.add_argument("checkpoint", type=Path, help="checkpoint folder, e.g. artifacts/dpo")
    export.add_argument("out", type=Path,
                        help="folder to write (hf), or the .gguf file (gguf; a Modelfile goes beside it)")
    export.add_argument("--format", choices=["hf", "gguf"], default="hf", help="transformers folder or GGUF file")
    export.add_argument("--quantization", choices=["f16", "q8_0", "f32"], default="f16", help="GGUF weights")
    export.add_argument("--adapter", type=Path, help="also export this peft adapter (to OUT/adapter)")
    export.add_argument("--metrics", type=Path, default=Path("reports/eval/metrics.json"),
                        help="eval metrics for the model card (the checkpoint's stage is looked up)")
    importer = sub.add_parser("import", help="a transformers Llama folder back into a native checkpoint")
    importer.add_argument("hf_dir", type=Path, help="exported (or compatible Llama) folder")
    importer.add_argument("out", type=Path, help="checkpoint folder to write")
    preset = sub.add_parser("preset", help="print a named set of params as -S flags for dvc exp run")
    preset.add_argument("name", help="preset name (gpu)")
    bench_parser = sub.add_parser("bench", help="throughput benchmarks")
    bench_sub = bench_parser.add_subparsers(dest="what", required=True)
    train = bench_sub.add_parser("train", help="training tokens/s, MFU and memory of model presets",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_args(train, dtype_help="autocast dtype; auto is bf16 on CUDA")
    train.add_argument("--compile", type=_compile_list, default=[False],
                       help=f"comma list of on, off or a torch.compile mode ({', '.join(COMPILE_MODES)})")
    train.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    train.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    train.add_argument("--steps", type=int, default=30, help="timed steps")
    train.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    train.add_argument("--tokens", type=Path, default=None,
                       help="train on this token folder (e.g. artifacts/tokens) instead of random tokens")
    train.add_argument("--strategy", type=_names_from(bench.STRATEGIES, "strategy"), default=["ddp"],
                       help=f"comma list of {', '.join(bench.STRATEGIES)} (several processes: run under torchrun)")
    train.add_argument("--threads", type=_cpu_threads, default="auto",
                       help="CPU threads: auto (torch's own, fixed), follow (one per free core) or a number")
    train.add_argument("--log-interval", type=_checked(int, lambda v: v > 0, "> 0"), default=10,
                       help="steps per log point (each reads the loss: one host sync)")
    train.add_argument("--profile", type=Path, default=None, metavar="DIR",
                       help="also profile the first 5 timed steps; traces and top operators go to DIR "
                       "(the run's tokens/s then includes writing them)")
    train.add_argument("--name", default="train", help="table file name prefix")
    train.add_argument("--out", type=Path, default=Path("reports/bench"), help="folder for the table")
    infer = bench_sub.add_parser("infer", help="generation speed: time to first token, decode tokens/s",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_args(infer, dtype_help="weights dtype; auto is bf16 on CUDA")
    infer.add_argument("--batch-sizes", type=lambda t: [int(b) for b in t.split(",")], default=[1, 8, 32],
                       help="comma list of prompts generated together")
    infer.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    infer.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    infer.add_argument("--name", default="infer", help="table file name prefix")
    serve_bench = bench_sub.add_parser("serve", help="the API under 1, 8, 32 concurrent streaming clients",
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve_bench.add_argument("checkpoint", nargs="?", help="what to serve (default: the pipeline's newest chat model)")
    serve_bench.add_argument("--model", choices=list(bench.PRESETS), default=None,
                             help="serve random weights of this shape (with the checkpoint's tokenizer) instead")
    ints = _checked(lambda t: [int(n) for n in t.split(",")], lambda ns: min(ns) >= 1, "a comma list of numbers >= 1")
    serve_bench.add_argument("--clients", type=ints, default=[1, 8, 32], help="comma list of concurrent clients")
    serve_bench.add_argument("--slots", type=ints, default=[1, 32],
                             help="comma list of server batch sizes to compare (1: one request at a time)")
    serve_bench.add_argument("--requests", type=int, default=4, help="requests per client")
    serve_bench.add_argument("--max-tokens", type=int, default=64, help="tokens of each reply (end tokens ignored)")
    serve_bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve_bench.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                             help="the server's weights (auto: bf16 on a GPU, fp32 on the CPU)")
    serve_bench.add_argument("--batch-invariant", action="store_true",
                             help="serve with `tinyllm serve --batch-invariant`")
    serve_bench.add_argument("--out", type=Path, default=Path("reports/serving"), help="folder for the table")
    infer.add_argument("--out", type=Path, default=Path("reports/bench"), help="folder for the table")
    return parser


def chat_repl(args) -> None:
    """Read user turns from stdin, stream replies to stdout, until /exit or end of input."""
    from tinyllm.infer.chat import ChatSession, load_chat_model

    model, tok, description = load_chat_model(args.checkpoint, args.adapter, args.device)
    session = ChatSession(model, tok, system_prompt=args.system, max_new_tokens=args.max_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    print(f"chatting with {description} (/reset clears the conversation, /exit quits)", flush=True)
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", flush=True)
            continue
        if not text:
            continue
        dropped = session.dropped_turns
        print("assistant> ", end="", flush=True)
        try:
            for piece in session.send(text):
                print(piece, end="", flush=True)
        except UserError as err:
            print(f"\n(error: {err})", flush=True)
            continue
        except KeyboardInterrupt:
            print(" (interrupted)", end="")
        print(flush=True)
        if session.dropped_turns > dropped:
            print(f"(the oldest {session.dropped_turns - dropped} turn(s) no longer fit the context and were dropped)",
                  flush=True)


def serve(args) -> None:
    import uvicorn

    from tinyllm.serve.api import create_app
    from tinyllm.serve.models import load_served_models

    models = load_served_models(args.checkpoints, args.adapter)
    for m in models:
        print(f"serving {m.description} as model {m.name!r} ({m.context}-token context)", flush=True)
    app = create_app(models, args.api_key, max_queue=args.max_queue, slots=args.slots,
                     prefill_tokens=args.prefill_tokens, max_live_tokens=args.max_live_tokens,
                     decode_steps=args.decode_steps, device=args.device, dtype=args.dtype, threads=args.threads,
                     invariant=args.batch_invariant)
    for name, engine in app.state.batchers.items():  # as the engine reports it
        print(f"model {name!r} decodes at batch sizes {', '.join(map(str, engine.decode_sizes))}", flush=True)
    print(f"OpenAI-compatible API on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}, up to {args.slots} requests at once"
          f"{', batch-invariant' if args.batch_invariant else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def web_page(args) -> None:
    """`streamlit run tinyllm/serve/web.py` with our defaults (127.0.0.1, no telemetry)."""
    import importlib.util
    import subprocess

    page = importlib.util.find_spec("tinyllm.serve.web").origin  # not imported: the page runs on import
    cmd = [sys.executable, "-m", "streamlit", "run", page, "--server.address", args.host,
           "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "minimal",
           "--", "--artifacts", str(args.artifacts), "--device", args.device]
    print(f"web chat on http://{args.host}:{args.port}", flush=True)
    sys.exit(subprocess.call(cmd))


def convert(args) -> str:
    import json

    from tinyllm.export import export_hf, import_hf
    from tinyllm.train.checkpoint import read_config

    if args.command == "import":
        return f"imported {args.hf_dir} as {import_hf(args.hf_dir, args.out)}"
    if args.format == "gguf":
        from tinyllm.export_gguf import export_gguf

        if args.adapter:
            raise UserError("--adapter: merge it first (the pipeline's lora stage writes the merged model)")
        out = export_gguf(args.checkpoint, args.out, args.quantization)
        return (f"exported {args.checkpoint} to {out} "
                f"(llama-cli -m {out}; ollama create NAME -f {out.parent / 'Modelfile'})")
    stage = read_config(args.checkpoint).get("stage") if (args.checkpoint / "config.json").exists() else None
    try:
        metrics = json.loads(args.metrics.read_text(encoding="utf-8")).get(stage) if args.metrics.exists() else None
    except (ValueError, OSError, AttributeError) as err:
        raise UserError(f"--metrics {args.metrics}: not a JSON object of stages' metrics ({err})") from None
    if not isinstance(metrics, (dict, type(None))):
        raise UserError(f"--metrics {args.metrics}: {stage!r} holds {type(metrics).__name__}, not its metrics")
    out = export_hf(args.checkpoint, args.out, adapter=args.adapter, metrics=metrics)
    return f"exported {args.checkpoint} to {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        run_command(args)
    except (UserError, FileNotFoundError) as err:  # bad input: one line naming it, no traceback
        sys.exit(f"error: {err}")


def run_command(args) -> None:
    if args.command == "preset":
        from tinyllm.presets import preset_flags

        print(preset_flags(args.name))
    elif args.command == "chat":
        chat_repl(args)
    elif args.command == "serve":
        serve(args)
    elif args.command == "web":
        web_page(args)
    elif args.command in ("export", "import"):
        print(convert(args))
    elif args.command == "bench" and args.what == "train":
        print(bench.run(args.models, args.compile, args.out, seq_len=args.seq_len, batch_size=args.batch_size,
                        vocab_size=args.vocab_size, steps=args.steps, warmup=args.warmup, device=args.device,
                        dtype=args.dtype, tokens=args.tokens, strategies=args.strategy, name=args.name,
                        profile_dir=args.profile, log_interval=args.log_interval, threads=args.threads))
    elif args.command == "bench" and args.what == "serve":
        print(bench.run_serve(args.checkpoint, args.out, preset=args.model, clients=args.clients, slots=args.slots,
                              requests=args.requests, max_tokens=args.max_tokens, device=args.device,
                              dtype=args.dtype, invariant=args.batch_invariant))
    elif args.command == "bench" and args.what == "infer":
        print(bench.run_infer(args.models, args.batch_sizes, args.out, name=args.name, prompt_len=args.prompt_len,
                              new_tokens=args.new_tokens, vocab_size=args.vocab_size, device=args.device,
                              dtype=args.dtype))


if __name__ == "__main__":
    main()
