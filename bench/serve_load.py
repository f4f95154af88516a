"""Serving on SmolLM2-135M-Instruct: batching, multiplexing memory, adapter load time, autoscaling.

    python bench/serve_load.py [--max-tokens 32] [--out runs/bench/serve] [--parts overhead,load,memory,cold,ramp,engines]
    python bench/serve_load.py --parts engines,memory   # the engines' comparison: bench/results/serve_engines.json

- overhead: one request through Serve (HTTP -> gateway -> engine) against a bare `model.generate`
  of the same prompt and length in this process. Target: Serve adds <= 20%.
- load: throughput and p50/p99 latency at 1, 8 and 32 concurrent clients, batching on
  (serve.max_batch_size=32) and off (1), same app otherwise. Target: batched >= 4x unbatched at 32.
- memory: resident memory of the base with 1 and with 8 adapters in the HF engine's slots, against one merged
  model per adapter (each in a fresh process, after a forward pass so that memory-mapped weights
  count). Target: 8 multiplexed <= 1.25x one.
- cold: time to a first token for an adapter not loaded yet, against the same request warm.
- ramp: replica count over time while clients ramp 1 -> 12 -> 0 (autoscaling 1..2 replicas of
  one CPU each: all this 2-core machine has); PNG written to --out.
- engines: bare vLLM `LLM.generate` and bare transformers `generate` + PEFT (the limits: every
  prompt handed over at once; and a lone prompt), lorafleet serve on vLLM and on the HF engine; 1,
  8 and 32 clients on one adapter, and 32 clients over 8 adapters mixed. Targets: serve-on-vLLM at
  32 clients >= 0.8x bare vLLM tokens/s, a lone request <= 1.2x bare vLLM's (the same request),
  8 mixed >= 0.7x one adapter; HF engine at 32 clients >= 0.9x bare generate's batch, 8 mixed >=
  0.9x one adapter and >= the vLLM engine's mixed figure, a lone request <= 1.1x bare generate's time
  per token, p50 latency at 32 clients <= half of what static batches gave (STATIC_P50_S).

The base runs unquantized: on CPU, bitsandbytes 4-bit generation is about 2x slower than fp32
(3.76 s vs 1.79 s for 32 tokens, measured here); on a GPU use serve.quantization=as_trained.
Adapters are random rank-8 all-linear LoRAs (the shape of the SQuAD sweep's best trial).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from results import markdown_row, target, write_result  # bench/ is this script's folder

PROMPT = "Write a long story about a robot who learns to paint."
ADAPTERS = 8
BASE_NAME = "smollm2-135m-instruct"
# p50 latency at 32 clients of the HF engine on static batches (serve.batch; the step loop replaced them for causal
# models), from this script's engines part on the 2-core machine its figures come from: the p50 target's reference.
STATIC_P50_S = 16.6


def _config(out: Path, *overrides: str):
    from jobs.config import load_config

    return load_config(None, ["quantization.mode=none", f"serve.adapter_root={out / 'adapters'}", "serve.replica_resources={CPU: 2}",
                              "serve.max_ongoing_requests=64", "serve.max_concurrent_requests=64", *overrides])


def make_adapters(out: Path) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model

    from jobs.config import load_config
    from jobs.model import load_base

    root = out / "adapters"
    names = [f"adapter{i}" for i in range(ADAPTERS)]
    if all((root / n / "adapter_model.safetensors").is_file() for n in names):
        return names
    run = load_config(None, ["quantization.mode=none"])
    for i, name in enumerate(names):
        torch.manual_seed(i)
        model = get_peft_model(load_base(run, torch.device("cpu"), "causal"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        model.save_pretrained(root / name)
    return names


def chat_body(model: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0}


# --- overhead -------------------------------------------------------------------------------

def bare_generate_seconds(max_tokens: int, repeats: int = 5) -> float:
    import torch

    from jobs.config import load_config
    from jobs.model import load_base, load_tokenizer

    torch.set_num_threads(2)
    run = load_config(None, ["quantization.mode=none"])
    tokenizer = load_tokenizer(run.model)
    model = load_base(run, torch.device("cpu"), "causal").eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    times = []
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            times.append(time.perf_counter() - start)
    assert out.shape[1] - inputs["input_ids"].shape[1] == max_tokens
    return statistics.median(times)


def serve_request_seconds(url: str, model: str, max_tokens: int, repeats: int = 5) -> float:
    times = []
    with httpx.Client(base_url=url, timeout=300) as client:
        client.post("/chat/completions", json=chat_body(model, 4))
        for _ in range(repeats):
            start = time.perf_counter()
            body = client.post("/chat/completions", json=chat_body(model, max_tokens)).json()
            times.append(time.perf_counter() - start)
            assert body["usage"]["completion_tokens"] == max_tokens, body
    return statistics.median(times)


def lone_request(url: str, model: str, max_tokens: int, repeats: int = 7) -> dict:
    """A lone request's latency (median) and its answer's length, the same request as bare vLLM's lone one."""
    seconds, tokens = [], set()
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(repeats):
            start = time.perf_counter()
            body = client.post("/chat/completions", json=chat_body(model, max_tokens)).json()
            seconds.append(time.perf_counter() - start)
            tokens.add(body["usage"]["completion_tokens"])
    return {"s": statistics.median(seconds), "tokens": sorted(tokens)}


# --- load -----------------------------------------------------------------------------------

def load_level(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    latencies, tokens, lock = [], [0], threading.Lock()
    per_client = max(1, requests // clients)

    def client_loop(_):
        with httpx.Client(base_url=url, timeout=900) as client:
            for _ in range(per_client):
                start = time.perf_counter()
                response = client.post("/chat/completions", json=chat_body(model, max_tokens))
                elapsed = time.perf_counter() - start
                response.raise_for_status()
                with lock:
                    latencies.append(elapsed)
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "tokens_per_s": tokens[0] / wall, "requests_per_s": len(latencies) / wall,
            "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


# --- memory ---------------------------------------------------------------------------------

def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1024**2


def memory_scenario(scenario: str, adapter_root: str) -> float:
    """Resident MB added by loading `scenario`, measured in a fresh process."""
    import gc

    import torch
    from peft import PeftModel

    from jobs.config import load_config
    from jobs.model import load_base
    from serve.multi_lora import MultiLora

    torch.set_num_threads(2)
    run = load_config(None, ["quantization.mode=none"])
    gc.collect()
    before = _rss_mb()
    names = [f"adapter{i}" for i in range(ADAPTERS)]
    if scenario == "merged":
        keep = [PeftModel.from_pretrained(load_base(run, torch.device("cpu"), "causal"), f"{adapter_root}/{n}").merge_and_unload() for n in names]
    else:
        count = {"base": 0, "one": 1, "eight": ADAPTERS}[scenario]
        model = load_base(run, torch.device("cpu"), "causal")
        lora = MultiLora(model, torch.device("cpu"))  # as the HF engine does: adapters stacked in slots over one base
        for name in names[:count]:
            lora.load(name, Path(adapter_root) / name)
        keep = [model]
    inputs = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():  # as a serving replica does: every weight page is touched (safetensors are memory-mapped)
        for model in keep:
            if scenario in ("one", "eight"):
                with lora.routing([names[0]]):
                    model(input_ids=inputs)
            else:
                model(input_ids=inputs)
    gc.collect()
    return _rss_mb() - before


def memory_table(out: Path) -> dict:
    results = {}
    for scenario in ("base", "one", "eight", "merged"):
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            results[scenario] = pool.submit(memory_scenario, scenario, str(out / "adapters")).result()
    return results


# --- cold adapter load ----------------------------------------------------------------------

def cold_load(url: str, names: list[str]) -> dict:
    cold, warm = [], []
    with httpx.Client(base_url=url, timeout=300) as client:
        for name in names:
            for bucket in (cold, warm):
                start = time.perf_counter()
                client.post("/chat/completions", json=chat_body(name, 1)).raise_for_status()
                bucket.append(time.perf_counter() - start)
    return {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm), "load_s": statistics.median(c - w for c, w in zip(cold, warm, strict=True))}


# --- engines --------------------------------------------------------------------------------

def bare_vllm(adapter_root: str, names: list[str], max_tokens: int, prompts: int) -> dict:
    """vLLM's offline engine in this (fresh) process: a lone request, then `prompts` at once."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from jobs.config import load_config
    from jobs.model import load_tokenizer, model_path

    run = load_config(None, ["quantization.mode=none"])
    llm = LLM(model=model_path(run.model), dtype="bfloat16", enable_lora=True, max_lora_rank=8, max_loras=len(names),
              max_cpu_loras=len(names), enforce_eager=True, kv_cache_memory_bytes=2 * 1024**3, seed=0)
    tokenizer = load_tokenizer(run.model)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0)
    loras = [LoRARequest(n, i + 1, f"{adapter_root}/{n}") for i, n in enumerate(names)]
    lone_params = SamplingParams(max_tokens=max_tokens, temperature=0)  # what the served request asks: it may end early
    llm.generate([text], lone_params, lora_request=loras[0], use_tqdm=False)  # warm-up, adapter loaded
    lone, tokens = [], set()
    for _ in range(7):
        start = time.perf_counter()
        out = llm.generate([text], lone_params, lora_request=loras[0], use_tqdm=False)
        lone.append(time.perf_counter() - start)
        tokens.add(len(out[0].outputs[0].token_ids))
    result = {"lone": {"s": statistics.median(lone), "tokens": sorted(tokens)}}
    for label, requests in (("one", [loras[0]] * prompts), ("mixed", [loras[i % len(loras)] for i in range(prompts)])):
        llm.generate([text] * len(loras), params, lora_request=loras, use_tqdm=False)  # every adapter loaded
        start = time.perf_counter()
        outs = llm.generate([text] * prompts, params, lora_request=requests, use_tqdm=False)
        result[f"{label}_tokens_per_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
    return result


def bare_hf(adapter_root: str, name: str, max_tokens: int, prompts: int) -> dict:
    """transformers' generate with one PEFT adapter in this process: a lone prompt, then `prompts` in one call
    (the limit for the HF engine: every prompt of the batch handed over at once)."""
    import torch
    from peft import PeftModel

    from jobs.config import load_config
    from jobs.model import load_base, load_tokenizer

    torch.set_num_threads(2)
    run = load_config(None, ["quantization.mode=none"])
    tokenizer = load_tokenizer(run.model)
    tokenizer.padding_side = "left"
    model = PeftModel.from_pretrained(load_base(run, torch.device("cpu"), "causal"), f"{adapter_root}/{name}").eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    result = {}
    with torch.inference_mode():
        for label, count in (("lone", 1), ("batch", prompts)):
            inputs = tokenizer([text] * count, return_tensors="pt", add_special_tokens=False, padding=True)
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            elapsed = time.perf_counter() - start
            result[label] = {"s": elapsed, "tokens_per_s": count * (out.shape[1] - inputs["input_ids"].shape[1]) / elapsed}
    return result


def mixed_level(url: str, names: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """As load_level, each client cycling through every adapter."""
    tokens, lock, start = [0], threading.Lock(), time.perf_counter()

    def client_loop(k):
        with httpx.Client(base_url=url, timeout=900) as client:
            for j in range(max(1, requests // clients)):
                response = client.post("/chat/completions", json=chat_body(names[(k + j) % len(names)], max_tokens))
                response.raise_for_status()
                with lock:
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    return {"clients": clients, "tokens_per_s": tokens[0] / (time.perf_counter() - start)}


def engine_rows(out: Path, names: list[str], engine: str, levels: list[int], max_tokens: int) -> dict:
    from ray import serve

    from serve.app import deploy

    url = deploy(_config(out, f"serve.engine={engine}", "serve.max_batch_size=32", "serve.vllm_max_lora_rank=8",
                         "serve.vllm_kv_cache_gib=2")).url
    for name in names:  # every adapter loaded before timing
        httpx.post(f"{url}/chat/completions", json=chat_body(name, 1), timeout=300).raise_for_status()
    rows = {"lone": lone_request(url, names[0], max_tokens),
            "one": [load_level(url, names[0], c, max(16, 2 * c), max_tokens) for c in levels],
            "mixed": mixed_level(url, names, 32, 64, max_tokens)}
    serve.delete("lorafleet")
    return rows


def engines_table(r: dict, max_tokens: int) -> tuple[list[dict], list[dict]]:
    """Prints the engines' table and ratios; returns its rows and targets."""
    bare, v, h = r["bare_vllm"], r["vllm"], r["hf"]

    def lone(x: dict) -> str:
        return f"{x['s']:.2f} ({'/'.join(map(str, x['tokens']))})"

    columns = ["path", "lone request, s (tokens)", "1 client tok/s", "8 clients tok/s", "32 clients tok/s", "32 clients p50 s",
               "32 clients, 8 adapters mixed tok/s"]
    print(f"\n## Engines: SmolLM2-135M bf16 (vLLM) / fp32 (HF), rank-8 adapters, {max_tokens} new tokens, greedy\n")
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|")
    table = [dict(zip(columns, ["bare vLLM LLM.generate (all prompts at once)", lone(bare["lone"]), "-", "-", f"{bare['one_tokens_per_s']:.1f}",
                                "-", f"{bare['mixed_tokens_per_s']:.1f}"], strict=True))]
    hf_bare = r["bare_hf"]
    table.append(dict(zip(columns, ["bare transformers generate + PEFT (32 prompts in one call)", f"{hf_bare['lone']['s']:.2f} ({max_tokens})", "-",
                                    "-", f"{hf_bare['batch']['tokens_per_s']:.1f}", f"{hf_bare['batch']['s']:.2f}", "-"], strict=True)))
    for label, row in (("lorafleet serve, engine vllm", v), ("lorafleet serve, engine hf", h)):
        by = {x["clients"]: x for x in row["one"]}
        table.append(dict(zip(columns, [label, lone(row["lone"]), *(f"{by[c]['tokens_per_s']:.1f}" if c in by else "-" for c in (1, 8, 32)),
                                        f"{by[32]['p50_s']:.2f}" if 32 in by else "-", f"{row['mixed']['tokens_per_s']:.1f}"], strict=True)))
    for row in table:
        print(markdown_row(row))
    at32 = {x["clients"]: x["tokens_per_s"] for x in v["one"]}[32]
    hf32 = {x["clients"]: x["tokens_per_s"] for x in h["one"]}[32]
    same = "same answer length" if v["lone"]["tokens"] == bare["lone"]["tokens"] else "DIFFERENT answer lengths: not comparable"
    print(f"\nserve-on-vLLM / bare vLLM at 32 clients: {at32 / bare['one_tokens_per_s']:.2f}x (target >= 0.8x)")
    print(f"lone request, serve-on-vLLM / bare vLLM: {v['lone']['s'] / bare['lone']['s']:.2f}x (target <= 1.2x; {same})")
    print(f"8 mixed adapters / one adapter, serve-on-vLLM at 32 clients: {v['mixed']['tokens_per_s'] / at32:.2f}x (target >= 0.7x)")
    print(f"serve-on-vLLM / serve-on-HF at 32 clients: {at32 / hf32:.2f}x; mixed: {v['mixed']['tokens_per_s'] / h['mixed']['tokens_per_s']:.2f}x")
    hf_mixed = h["mixed"]["tokens_per_s"]
    print(f"HF engine at 32 clients / bare generate's batch of 32: {hf32 / hf_bare['batch']['tokens_per_s']:.2f}x (target >= 0.9x)")
    print(f"HF engine, 8 mixed adapters / one adapter at 32 clients: {hf_mixed / hf32:.2f}x (target >= 0.9x)")
    # per token: a served answer may end before max_tokens at its end-of-sequence, bare generate is forced to the limit
    lone_ratio = (h["lone"]["s"] / max(h["lone"]["tokens"])) / (hf_bare["lone"]["s"] / max_tokens)
    print(f"HF engine lone request / bare generate alone, seconds per token: {lone_ratio:.2f}x (target <= 1.1x)")
    hf_p50 = {x["clients"]: x["p50_s"] for x in h["one"]}[32]
    print(f"HF engine p50 latency at 32 clients: {hf_p50:.2f} s; static batches: {STATIC_P50_S} s (target <= half)")
    return table, [
        target("HF engine / bare generate batch tokens/s at 32 clients", hf32 / hf_bare["batch"]["tokens_per_s"], ">=", 0.9, "x"),
        target("8 mixed adapters / one adapter tokens/s, HF engine at 32 clients", hf_mixed / hf32, ">=", 0.9, "x"),
        target("8 mixed adapters, HF engine / vLLM engine tokens/s", hf_mixed / v["mixed"]["tokens_per_s"], ">=", 1.0, "x"),
        target("lone request seconds per token, HF engine / bare generate alone", lone_ratio, "<=", 1.1, "x"),
        target("p50 latency at 32 clients, HF engine / its static batches", hf_p50 / STATIC_P50_S, "<=", 0.5, "x"),
        target("serve-on-vLLM / bare vLLM tokens/s at 32 clients", at32 / bare["one_tokens_per_s"], ">=", 0.8, "x"),
        target(f"lone request latency, serve-on-vLLM / bare vLLM ({same})", v["lone"]["s"] / bare["lone"]["s"], "<=", 1.2, "x"),
        target("8 mixed adapters / one adapter tokens/s, serve-on-vLLM at 32 clients", v["mixed"]["tokens_per_s"] / at32, ">=", 0.7, "x"),
    ]


# --- autoscaling ramp -----------------------------------------------------------------------

def replica_count(app: str, deployment: str = "Engine") -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return int(status.deployments[deployment].replica_states.get("RUNNING", 0))


def ramp(url: str, app: str, model: str, max_tokens: int, phases: list[tuple[int, float]]) -> list[dict]:
    samples, stop, active = [], threading.Event(), [0]

    def client_loop(until: float):
        with httpx.Client(base_url=url, timeout=300) as client:
            while time.time() < until and not stop.is_set():
                client.post("/chat/completions", json=chat_body(model, max_tokens))

    start = time.time()
    threads = []
    for clients, seconds in phases:
        until = time.time() + seconds
        active[0] = clients
        threads += [threading.Thread(target=client_loop, args=(until,), daemon=True) for _ in range(clients)]
        for t in threads[len(threads) - clients:]:
            t.start()
        while time.time() < until:
            samples.append({"t": round(time.time() - start, 1), "clients": clients, "replicas": replica_count(app)})
            time.sleep(1)
    stop.set()
    return samples


def plot_ramp(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    t = [s["t"] for s in samples]
    clients = ax.step(t, [s["clients"] for s in samples], where="post", label="concurrent clients", color="tab:gray")
    ax.set_xlabel("seconds")
    ax.set_ylabel("clients")
    ax2 = ax.twinx()
    replicas = ax2.step(t, [s["replicas"] for s in samples], where="post", label="engine replicas (RUNNING)", color="tab:blue", linewidth=2)
    ax2.set_ylabel("replicas")
    ax2.set_ylim(0, max(s["replicas"] for s in samples) + 1)
    ax2.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(handles=clients + replicas, loc="upper right")
    ax.set_title("Serve autoscaling under a load ramp (SmolLM2-135M, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- driver ---------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/serve"))
    parser.add_argument("--parts", default="overhead,load,memory,cold,ramp,engines")
    parser.add_argument("--levels", default="1,8,32", help="Concurrent clients of the load part.")
    parser.add_argument("--bare-vllm-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_vllm_json:
        names = [f"adapter{i}" for i in range(ADAPTERS)]
        args.bare_vllm_json.write_text(json.dumps(bare_vllm(str(args.out / "adapters"), names, args.max_tokens, 32)))
        return
    parts = set(args.parts.split(","))
    levels = [int(c) for c in args.levels.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    names = make_adapters(args.out)
    report: dict = {}

    if "memory" in parts:
        report["memory"] = memory_table(args.out)
    if "engines" in parts:  # before Ray starts, in a process of its own (vLLM hung inside a ProcessPoolExecutor worker)
        found = args.out / "bare_vllm.json"
        subprocess.run([sys.executable, __file__, "--bare-vllm-json", str(found), "--max-tokens", str(args.max_tokens), "--out", str(args.out)], check=True)
        report["bare_vllm"] = json.loads(found.read_text())
        report["bare_hf"] = bare_hf(str(args.out / "adapters"), names[0], args.max_tokens, 32)
    if "overhead" in parts:
        report["bare_s"] = bare_generate_seconds(args.max_tokens)

    import ray
    from ray import serve

    from serve.app import deploy

    ray.init(num_cpus=2)
    if parts & {"overhead", "load", "cold"}:
        for batch in (32, 1):
            url = deploy(_config(args.out, f"serve.max_batch_size={batch}")).url
            if batch == 32 and "overhead" in parts:
                report["serve_s"] = serve_request_seconds(url, BASE_NAME, args.max_tokens)
            if batch == 32 and "cold" in parts:
                report["cold"] = cold_load(url, names[1:])
            if "load" in parts:
                label = f"on ({batch} rows)" if batch > 1 else "off"
                report.setdefault("load", {})[label] = [load_level(url, names[0], c, max(16, 2 * c), args.max_tokens) for c in levels]
            serve.delete("lorafleet")
    if "engines" in parts:
        for engine in ("vllm", "hf"):
            report[engine] = engine_rows(args.out, names, engine, levels, args.max_tokens)
    if "ramp" in parts:
        run = _config(args.out, "serve.replica_resources={CPU: 1}", "serve.max_replicas=2", "serve.target_ongoing_requests=2",
                      "serve.upscale_delay_s=3", "serve.downscale_delay_s=10", "serve.max_batch_size=8")
        url = deploy(run).url
        samples = ramp(url, "lorafleet", names[0], 16, [(1, 15), (12, 45), (0, 100)])
        report["ramp"] = samples
        plot_ramp(samples, args.out / "serve_ramp.png")
    serve.shutdown()
    ray.shutdown()
    (args.out / "serve_load.json").write_text(json.dumps(report, indent=2))
    tables, targets = print_tables(report, args)
    name = "serve_engines" if parts <= {"engines", "memory"} else "serve_load"  # an engines run keeps the full run's file
    write_result(name, {k: v for k, v in vars(args).items() if k != "bare_vllm_json"}, tables, targets)


def print_tables(r: dict, args) -> tuple[dict[str, list[dict]], list[dict]]:
    """Prints each part's table; returns them ({title: rows}) and the targets."""
    tables: dict[str, list[dict]] = {}
    targets: list[dict] = []

    def show(title: str, rows: list[dict]) -> None:
        tables[title] = rows
        for row in rows:
            print(markdown_row(row))

    if "bare_s" in r and "serve_s" in r:
        overhead = r["serve_s"] / r["bare_s"] - 1
        print(f"\n## Single request, {args.max_tokens} tokens (target: Serve adds <= 20%)\n")
        print("| path | median s | overhead |\n|---|---|---|")
        show(f"Single request, {args.max_tokens} tokens", [{"path": "bare model.generate", "median s": f"{r['bare_s']:.2f}", "overhead": "-"},
                                                            {"path": "Serve (HTTP -> gateway -> engine)", "median s": f"{r['serve_s']:.2f}", "overhead": f"{overhead:+.1%}"}])
        targets.append(target("Serve's overhead on a single request", 100 * overhead, "<=", 20, "%"))
    if "load" in r:
        print(f"\n## Load, {args.max_tokens} tokens per request (target: batched >= 4x unbatched at 32 clients)\n")
        print("| clients | batching | requests | tokens/s | requests/s | p50 s | p99 s |\n|---|---|---|---|---|---|---|")
        show(f"Load, {args.max_tokens} tokens per request", [
            {"clients": str(row["clients"]), "batching": label, "requests": str(row["requests"]), "tokens/s": f"{row['tokens_per_s']:.1f}",
             "requests/s": f"{row['requests_per_s']:.2f}", "p50 s": f"{row['p50_s']:.2f}", "p99 s": f"{row['p99_s']:.2f}"}
            for label, rows in r["load"].items() for row in rows])
        off = {row["clients"]: row["tokens_per_s"] for row in r["load"].get("off", [])}
        for label, rows in r["load"].items():
            if label != "off" and off:
                ratios = [f"{row['clients']} clients {row['tokens_per_s'] / off[row['clients']]:.2f}x" for row in rows]
                print(f"\nthroughput, batching {label} / off: {', '.join(ratios)}")
                targets += [target(f"batching {label} / off, tokens/s at 32 clients", row["tokens_per_s"] / off[32], ">=", 4, "x")
                            for row in rows if row["clients"] == 32 and 32 in off]
    if "memory" in r:
        m = r["memory"]
        print("\n## Memory, fp32 base + rank-8 adapters (target: 8 multiplexed <= 1.25x one)\n")
        print("| what | resident MB | vs base + 1 adapter |\n|---|---|---|")
        show("Memory, fp32 base + rank-8 adapters", [
            {"what": label, "resident MB": f"{m[key]:.0f}", "vs base + 1 adapter": f"{m[key] / m['one']:.2f}x"}
            for key, label in (("base", "base alone"), ("one", "base + 1 adapter"), ("eight", f"base + {ADAPTERS} adapters, multiplexed"), ("merged", f"{ADAPTERS} merged models, one per adapter"))])
        targets.append(target(f"memory, {ADAPTERS} multiplexed adapters / one", m["eight"] / m["one"], "<=", 1.25, "x"))
    if "cold" in r:
        c = r["cold"]
        print(f"\n## Adapter load (1-token request, median of {ADAPTERS - 1} adapters)\n")
        print("| cold request s | warm request s | load time s |\n|---|---|---|")
        show(f"Adapter load (1-token request, median of {ADAPTERS - 1} adapters)",
             [{"cold request s": f"{c['cold_s']:.2f}", "warm request s": f"{c['warm_s']:.2f}", "load time s": f"{c['load_s']:.2f}"}])
    if "bare_vllm" in r:
        tables["Engines, side by side"], engine_targets = engines_table(r, args.max_tokens)
        targets += engine_targets
    if "ramp" in r:
        peak = max(s["replicas"] for s in r["ramp"])
        up = next((s["t"] for s in r["ramp"] if s["replicas"] == peak), None)
        last = r["ramp"][-1]["replicas"]
        print(f"\n## Autoscaling ramp: 1 -> 12 -> 0 clients; replicas 1 -> {peak} (at {up} s) -> {last} at the end; plot: {args.out / 'serve_ramp.png'}")
        tables["Autoscaling ramp, 1 -> 12 -> 0 clients"] = [{"most replicas": str(peak), "reached at (s)": str(up), "replicas at the end": str(last)}]
    return tables, targets


if __name__ == "__main__":
    main()
