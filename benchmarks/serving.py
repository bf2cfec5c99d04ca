"""Serving benchmark: decode speed of the engine against the machine's memory-bandwidth bound.

Decoding one token reads every weight once (the tied embedding too, as the LM head), so on
a CPU a single stream can go no faster than ``bandwidth / model bytes`` tokens per second.
The script measures that bandwidth itself, in the same run (best of several sums of a
tensor far larger than the caches), and reports every figure also as a ratio to the bound:

- plain Hugging Face ``model.generate`` at batch 1 (greedy), the reference;
- the engine at batch 1: decode tok/s and time to first token;
- 1, 4 and 8 concurrent chat clients (real threads, each submitting chat requests to one
  Engine, or through the ModelHolder with ``--via-holder``): aggregate tok/s, its ratio to
  the batch-1 figure, the mean batch the engine decoded, TTFT median/worst.  For N clients
  the bound is N x the batch-1 bound (one read of the weights serves the whole batch).

``--backend`` picks the engine's decoder as the app's ``--backend`` does (``auto``: llama.cpp
on a CPU when ``llama-cpp-python`` is installed and the model has a GGUF; ``torch``).
``--vs-llamacpp`` also runs llama.cpp itself (``llama-cpp-python``'s ``Llama.generate``, its
own sampler, the same threads) on the embedded model's own Q4_1 GGUF and on the GGUF the
engine serves: a user's alternative, batch 1, and 8 chats served one after another; the
engine's figures are then also given as ratios to it.

Every request decodes exactly ``--max-new-tokens`` (``SamplingParams.ignore_eos``), so the
figures do not depend on where the model ends its answers.  The CPU may be shared: compare
ratios from one run, not absolute figures across runs.

    python benchmarks/serving.py                          # embedded SmolLM2-135M, fp32
    python benchmarks/serving.py --threads 1 --clients 1,4,8 --max-new-tokens 64 --rounds 2
    python benchmarks/serving.py --model /path/to/model --json /tmp/serving.json
    python benchmarks/serving.py --threads 2 --vs-llamacpp --no-hf --clients 1,8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from assistant import models  # noqa: E402
from assistant.engine import Engine, SamplingParams  # noqa: E402
from assistant.holder import ModelHolder  # noqa: E402
from assistant.serve import llamacpp_decoder  # noqa: E402
from assistant.settings import Settings  # noqa: E402

PROMPTS = [
    "Tell me a long story about a dragon who learns to cook.",
    "Explain in detail how a bicycle works, part by part.",
    "Write a long letter to a friend about your holidays by the sea.",
    "Describe the history of the printing press at length.",
    "Give me a detailed plan to learn to play the guitar in a year.",
    "Write a long essay on why people like to keep cats.",
    "Explain step by step how bread is made, from wheat to loaf.",
    "Describe a walk through a busy market in a big city.",
]


def measure_bandwidth(threads: int, mib: int = 512, repeats: int = 7) -> float:
    """Bytes per second read by a sum over a tensor much larger than the caches (best of N),
    with ``threads`` threads (all cores: the bound is what the machine can stream)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = torch.ones(mib * 1024 * 1024 // 4, dtype=torch.float32)
        t.sum()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            t.sum()
            best = min(best, time.perf_counter() - start)
        return t.numel() * t.element_size() / best
    finally:
        torch.set_num_threads(before)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights read per decoded token: every distinct parameter (tied ones once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def hf_reference(model, ids: list[int], n: int, repeats: int, threads: int) -> float:
    """Decode tok/s of plain ``model.generate`` (greedy, batch 1): (n-1) / (t(n) - t(1))."""
    x = torch.tensor([ids])

    def run(k: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        return time.perf_counter() - start

    torch.set_num_threads(threads)
    run(2)  # warm-up
    t1 = min(run(1) for _ in range(repeats))
    tn = min(run(n) for _ in range(repeats))
    return (n - 1) / max(tn - t1, 1e-9)


def clients_round(submit, engine: Engine, prompts: list[list[int]], n_clients: int, n_tokens: int,
                  requests_per_client: int) -> dict:
    """``n_clients`` threads each run ``requests_per_client`` chat requests one after another."""
    barrier = threading.Barrier(n_clients + 1)
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        barrier.wait()
        for r in range(requests_per_client):
            params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=n_tokens,
                                    seed=1000 * i + r, ignore_eos=True)
            try:
                req = submit(prompts[(i + r) % len(prompts)], params)
                count = sum(1 for _ in req)
            except BaseException as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(exc)
                return
            with lock:
                results.append({"tokens": count, "ttft_ms": req.ttft_ms, "submitted": req.submitted_at,
                                "first": req.first_token_at, "finished": req.finished_at})

    st = engine.stats
    before = (st.steps, st.decoded_tokens, st.model_s, st.busy_s)
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client request(s) failed: {errors[0]!r}")
    steps = st.steps - before[0]
    decoded = st.decoded_tokens - before[1]
    model_share = (st.model_s - before[2]) / max(st.busy_s - before[3], 1e-9)
    start = min(r["submitted"] for r in results)
    end = max(r["finished"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    decode_rates = [(r["tokens"] - 1) / (r["finished"] - r["first"]) for r in results if r["tokens"] > 1]
    ttfts = sorted(r["ttft_ms"] for r in results)
    return {"clients": n_clients, "requests": len(results), "tokens": tokens, "seconds": end - start,
            "aggregate_tok_s": tokens / (end - start), "mean_batch": decoded / steps if steps else 0.0,
            "model_share": model_share,
            "per_request_decode_tok_s": statistics.median(decode_rates) if decode_rates else 0.0,
            "ttft_ms_median": statistics.median(ttfts), "ttft_ms_max": ttfts[-1]}


def make_engine(loaded, args, max_batch: int, version: str) -> Engine:
    """The engine as the app builds it, with ``args.backend``'s decoder."""
    settings = Settings(backend=args.backend, data_dir=args.data_dir, max_batch=max_batch, threads=args.threads)
    return Engine(loaded.model, loaded.tokenizer, version=version, max_batch=max_batch, threads=args.threads,
                  decoder=llamacpp_decoder(settings, loaded))


def llamacpp_reference(gguf_path, prompts: list[list[int]], n_tokens: int, threads: int, sequential: int) -> dict:
    """llama.cpp itself on ``gguf_path``: batch-1 decode tok/s and TTFT of one chat, and the
    aggregate tok/s of ``sequential`` chats served one after another (what one llama.cpp
    process gives several users), sampling at temperature 0.7, top-p 0.9, never stopping early."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False, seed=0)

    def chat(ids: list[int]) -> tuple[float, float, float]:
        llm.reset()
        start = time.perf_counter()
        first = None
        for count, _ in enumerate(llm.generate(ids, temp=0.7, top_p=0.9, top_k=0, reset=True), 1):
            if first is None:
                first = time.perf_counter()
            if count == n_tokens:
                break
        end = time.perf_counter()
        return first - start, (n_tokens - 1) / (end - first), end - start

    chat(prompts[0][:8])  # warm-up
    ttft, decode, _ = max((chat(prompts[0]) for _ in range(2)), key=lambda r: r[1])
    started = time.perf_counter()
    for i in range(sequential):
        chat(prompts[i % len(prompts)])
    aggregate = sequential * n_tokens / (time.perf_counter() - started)
    return {"gguf": str(gguf_path), "batch1_decode_tok_s": decode, "batch1_ttft_ms": 1000 * ttft,
            "sequential_chats": sequential, "sequential_aggregate_tok_s": aggregate}


def ttft_under_load(loaded, args, prompts: list[list[int]], streams: int, repeats: int = 3) -> dict:
    """Time to first token of a short prompt while ``streams`` long answers are being decoded
    (an engine with room for one more), and the longest pause of those streams meanwhile."""
    engine = make_engine(loaded, args, streams + 1, "ttft")
    try:
        long = SamplingParams(temperature=0.7, max_new_tokens=1000, ignore_eos=True)
        running = [engine.submit(prompts[i % len(prompts)], long) for i in range(streams)]
        while engine.stats.peak_batch < streams:
            time.sleep(0.01)
        ttfts = []
        for _ in range(repeats):
            time.sleep(0.2)
            short = engine.submit(prompts[0][:16] + prompts[0][-4:], SamplingParams(temperature=0, max_new_tokens=2))
            list(short)
            ttfts.append(short.ttft_ms)
        for r in running:
            r.cancel()
        return {"streams": streams, "ttft_ms": statistics.median(ttfts), "ttft_ms_max": max(ttfts)}
    finally:
        engine.close()


def swap_pause(holder: ModelHolder, build, prompt: list[int]) -> dict:
    """A hot swap while a stream is being written: how long new requests wait on the swap (the
    holder's lock), the longest gap between the stream's tokens while the new version loads
    and swaps in (loading shares the CPU), and whether the stream finished on the old weights."""
    old_version, old_engine = holder.current()
    req = holder.submit(prompt, SamplingParams(temperature=0.7, max_new_tokens=1000, ignore_eos=True))[2]
    stamps: list[float] = []

    def reader():
        for _ in req:
            stamps.append(time.perf_counter())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    while len(stamps) < 50:
        time.sleep(0.01)
    load_start = time.perf_counter()
    new_engine = build()
    swap_start = time.perf_counter()
    holder.swap(new_engine, "swapped")
    swap_end = time.perf_counter()
    probe = holder.submit(prompt, SamplingParams(temperature=0, max_new_tokens=2))
    list(probe[2])
    t.join()
    gaps_before = [b - a for a, b in zip(stamps, stamps[1:]) if b <= load_start]
    gaps_during = [b - a for a, b in zip(stamps, stamps[1:]) if load_start < b <= swap_end + 0.5]
    return {"load_s": swap_start - load_start, "swap_lock_ms": 1000 * (swap_end - swap_start),
            "gap_ms_median_before": 1000 * statistics.median(gaps_before),
            "gap_ms_max_during_load_and_swap": 1000 * max(gaps_during, default=0.0),
            "stream_tokens": len(req.tokens), "stream_finished_on_old": req.finish_reason == "length",
            "new_request_version": probe[0], "new_request_ttft_ms": probe[2].ttft_ms}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--model", default="embedded", help="model spec as the app takes it (default: embedded)")
    ap.add_argument("--data-dir", default="data", help="the app's data directory (model cache in <dir>/models)")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on CPU), float32, bfloat16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the engine (0 = torch default)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96, help="tokens every request decodes")
    ap.add_argument("--clients", default="1,4,8", help="comma-separated concurrent client counts")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of every measurement; the best of each is kept (a shared CPU "
                         "slows some rounds, never speeds one up)")
    ap.add_argument("--no-hf", action="store_true", help="skip the plain model.generate reference")
    ap.add_argument("--via-holder", action="store_true", help="clients submit through a ModelHolder")
    ap.add_argument("--ttft-streams", type=int, default=8,
                    help="TTFT of a short prompt while this many answers stream (0 = skip)")
    ap.add_argument("--swap", nargs="?", const="same", default=None, metavar="VERSION_DIR",
                    help="measure a hot swap under a stream, to this version (a LoRA adapter dir; default: "
                         "the same model loaded again)")
    ap.add_argument("--backend", default="torch", choices=["auto", "torch", "llamacpp"],
                    help="the engine's decoder, as the app's --backend (default here: torch)")
    ap.add_argument("--vs-llamacpp", action="store_true",
                    help="also run llama.cpp itself on the same GGUF (needs llama-cpp-python: pip install -e '.[bench]')")
    ap.add_argument("--llamacpp-gguf", default="",
                    help="with --vs-llamacpp, also run llama.cpp on this GGUF (a larger model's Q4_1, say: "
                         "benchmarks/larger_models.py --build writes one)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.vs_llamacpp:
        from assistant.engine import llamacpp

        if not llamacpp.available():
            print("--vs-llamacpp: llama-cpp-python is not installed; skipping the llama.cpp reference "
                  "(pip install -e '.[bench]' builds it)", flush=True)
            args.vs_llamacpp = False

    client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if args.max_new_tokens < 2 or not client_counts or min(client_counts) < 1:
        ap.error("--max-new-tokens must be >= 2 and --clients positive integers")
    torch.manual_seed(0)
    loaded = models.load(args.model, Path(args.data_dir).expanduser() / "models", dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    nbytes = model_bytes(model)
    default_threads = torch.get_num_threads()
    bandwidth = bandwidth1 = measure_bandwidth(default_threads)
    print(f"model {loaded.path}: {nbytes / 1e6:.0f} MB of {next(model.parameters()).dtype} weights; "
          f"memory bandwidth {bandwidth / 1e9:.1f} GB/s (tensor sum, {default_threads} threads)", flush=True)

    engine_threads = args.threads or default_threads
    out: dict = {"model": loaded.path, "model_bytes": nbytes, "threads": engine_threads,
                 "max_new_tokens": args.max_new_tokens}
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]) for p in PROMPTS]
    started = time.perf_counter()
    engine = make_engine(loaded, args, args.max_batch, "bench")
    out["engine_start_s"] = time.perf_counter() - started
    out["decoder"] = type(engine.decoder).__name__
    print(f"engine decoder: {out['decoder']}", flush=True)
    holder = ModelHolder(engine, "bench") if args.via_holder else None

    def submit(ids, params):
        return holder.submit(ids, params)[2] if holder else engine.submit(ids, params)

    # warm-up: one short request, then one short batch
    list(submit(prompts[0], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)))
    clients_round(submit, engine, prompts, min(4, args.max_batch), 4, 1)

    counts = sorted(set(client_counts) | {1})
    best: dict[int, dict] = {}
    for rnd in range(args.rounds):
        if not args.no_hf:
            hf = hf_reference(model, prompts[0], args.max_new_tokens, 1, engine_threads)
            out["hf_generate_tok_s"] = max(out.get("hf_generate_tok_s", 0.0), hf)
            print(f"round {rnd + 1}: HF generate {hf:.1f} tok/s", flush=True)
        for n in counts:
            res = clients_round(submit, engine, prompts, n, args.max_new_tokens, args.requests_per_client)
            print(f"round {rnd + 1}: {n} client(s) {res['aggregate_tok_s']:.1f} tok/s aggregate, "
                  f"decode {res['per_request_decode_tok_s']:.1f} tok/s per request, mean batch {res['mean_batch']:.1f}",
                  flush=True)
            if n not in best or res["aggregate_tok_s"] > best[n]["aggregate_tok_s"]:
                best[n] = res
            if n == 1:
                out["batch1_decode_tok_s"] = max(out.get("batch1_decode_tok_s", 0.0), res["per_request_decode_tok_s"])
    single = best[1]
    b1 = out["batch1_decode_tok_s"]
    out["batch1_ttft_ms"] = single["ttft_ms_median"]
    out["concurrent"] = [best[n] for n in client_counts]
    bandwidth2 = measure_bandwidth(default_threads)
    # The bound uses the higher of the two bandwidth readings: on a busy machine the lower one
    # would flatter every ratio.
    bandwidth = max(bandwidth, bandwidth2)
    bound = bandwidth / nbytes  # tok/s of one stream
    out.update(bandwidth_gb_s=bandwidth / 1e9, bound_tok_s=bound)
    out["bandwidth_readings_gb_s"] = [b / 1e9 for b in (bandwidth1, bandwidth2)]
    print(f"\nbandwidth {bandwidth1 / 1e9:.1f} GB/s at the start, {bandwidth2 / 1e9:.1f} at the end "
          f"(a large gap means a busy machine) -> bound {bound:.1f} tok/s at batch 1 "
          f"({nbytes / 1e6:.0f} MB read per token)")
    print(f"{'':38s}{'tok/s':>8s}  {'x bound':>8s}")
    if "hf_generate_tok_s" in out:
        hf = out["hf_generate_tok_s"]
        print(f"{'HF model.generate, batch 1 (decode)':38s}{hf:8.1f}  {hf / bound:8.2f}")
    print(f"{'engine, batch 1 (decode)':38s}{b1:8.1f}  {b1 / bound:8.2f}   TTFT {single['ttft_ms_median']:.0f} ms"
          + (f"; {b1 / out['hf_generate_tok_s']:.2f} x HF generate" if "hf_generate_tok_s" in out else ""))
    base = single["aggregate_tok_s"]
    for res in out["concurrent"]:
        n, agg = res["clients"], res["aggregate_tok_s"]
        res["ratio_to_bound"] = agg / bound
        res["ratio_to_1_client"] = agg / base
        print(f"{f'{n} concurrent clients (aggregate)':38s}{agg:8.1f}  {agg / bound:8.2f}   "
              f"{agg / base:.2f} x 1 client; mean batch {res['mean_batch']:.1f}; "
              f"TTFT median {res['ttft_ms_median']:.0f} ms, max {res['ttft_ms_max']:.0f} ms; "
              f"{100 * res['model_share']:.0f}% of engine time in the model")
    print("(x bound: to one stream's bound; N clients could reach N x bound if compute allowed)")
    if args.vs_llamacpp:
        from assistant.engine import gguf

        engine_gguf = gguf.serving_gguf(models.resolve(args.model, Path(args.data_dir).expanduser() / "models"),
                                        Path(args.data_dir).expanduser() / "models" / "gguf")
        refs = out["llamacpp"] = {}
        n_seq = max(client_counts)
        for name, path in (("embedded Q4_1 GGUF", models.embedded_gguf_path() if args.model == "embedded" else None),
                           ("given GGUF", args.llamacpp_gguf or None),
                           ("the GGUF the engine serves", engine_gguf)):
            if path is None:
                continue
            ref = refs[name] = llamacpp_reference(path, prompts, args.max_new_tokens, engine_threads, n_seq)
            many = next((r for r in out["concurrent"] if r["clients"] == n_seq), None)
            ref["engine_batch1_ratio"] = b1 / ref["batch1_decode_tok_s"]
            print(f"llama.cpp on the {name} ({Path(path).name}): batch 1 {ref['batch1_decode_tok_s']:.1f} tok/s, "
                  f"TTFT {ref['batch1_ttft_ms']:.0f} ms; {n_seq} chats one after another "
                  f"{ref['sequential_aggregate_tok_s']:.1f} tok/s.  Engine: batch 1 {ref['engine_batch1_ratio']:.2f} x "
                  f"(goal >= 0.5)" + (f", {n_seq} clients {many['aggregate_tok_s'] / ref['sequential_aggregate_tok_s']:.2f} x "
                                      f"its one-after-another (goal >= 2)" if many else ""), flush=True)
            if many:
                ref["engine_clients_ratio"] = many["aggregate_tok_s"] / ref["sequential_aggregate_tok_s"]
    if args.ttft_streams:
        res = out["ttft_under_load"] = ttft_under_load(loaded, args, prompts, args.ttft_streams)
        print(f"TTFT of a short prompt while {res['streams']} answers stream: median {res['ttft_ms']:.0f} ms, "
              f"max {res['ttft_ms_max']:.0f} ms (goal <= 500 ms)")
    if args.swap:
        holder = holder or ModelHolder(engine, "bench")
        target = args.model if args.swap == "same" else args.swap

        def build() -> Engine:
            new = models.load(target, Path(args.data_dir).expanduser() / "models", dtype=args.dtype)
            return make_engine(new, args, args.max_batch, "swapped")

        res = out["swap"] = swap_pause(holder, build, prompts[1])
        print(f"hot swap to {target}: new requests waited {res['swap_lock_ms']:.3f} ms on the swap (goal <= 100 ms); "
              f"loading took {res['load_s']:.1f} s, during which the running stream's longest gap was "
              f"{res['gap_ms_max_during_load_and_swap']:.0f} ms (median {res['gap_ms_median_before']:.0f} ms before); "
              f"the stream finished on the old weights: {res['stream_finished_on_old']}; "
              f"the next request ran on '{res['new_request_version']}'")
    (holder or engine).close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
