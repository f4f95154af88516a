"""A QLoRA adapter (trained on the 4-bit base) served on vLLM's unquantized base: what that changes on SQuAD.

    lorafleet train --config configs/squad-smollm2.yaml        # the adapter (runs/squad-smollm2/adapter)
    python bench/vllm_qlora_squad.py [--config configs/squad-smollm2.yaml] [--adapter runs/squad-smollm2/adapter]

The config's held-out questions (its seeded split: 54 for the SQuAD config), answered three ways
with the config's eval settings (greedy, eval.max_new_tokens, eval.stop) and scored with the same
official SQuAD exact match and F1:
- `lorafleet eval`: the adapter on the 4-bit NF4 base it was trained on (the training path);
- `lorafleet serve`, engine hf, `serve.quantization: none`: the adapter on the fp32 base;
- `lorafleet serve`, engine vllm: the adapter on vLLM's bf16 base.
Also: how many answers equal `lorafleet eval`'s word for word.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx


def served_answers(run, examples: list[dict], engine: str, adapter: Path) -> list[str]:
    from ray import serve

    from serve.app import deploy

    serving = run.model_copy(update={"serve": run.serve.model_copy(update={
        "engine": engine, "quantization": "none", "adapters": {"squad": str(adapter)}, "max_tokens_limit": 1024})})
    url = deploy(serving).url

    def ask(example: dict) -> str:
        body = {"model": "squad", "messages": [{"role": "user", "content": example["prompt"]}], "temperature": 0,
                "max_tokens": run.eval.max_new_tokens, "stop": run.eval.stop or None}
        response = httpx.post(f"{url}/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, examples))
    serve.delete(run.serve.name)
    return answers


def scored(answers: list[str], examples: list[dict]) -> dict:
    from jobs.metrics import aggregate, score

    per_example = [score(a, e["references"], ["squad"]) for a, e in zip(answers, examples, strict=True)]
    return aggregate(per_example, ["exact_match", "f1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/squad-smollm2.yaml")
    parser.add_argument("--adapter", type=Path, default=Path("runs/squad-smollm2/adapter"))
    args = parser.parse_args()

    import ray

    from jobs.config import load_config
    from jobs.data import held_out_examples
    from jobs.evaluation import run_eval

    run = load_config(args.config, [])
    examples = held_out_examples(run)
    trained = run_eval(run, args.adapter.resolve(), with_base=False, output_dir=Path(tempfile.mkdtemp()))
    reference = [g.text or "" for g in trained.results["adapter"].generations]
    rows = {"lorafleet eval (4-bit NF4 base, as trained)": reference}
    ray.init(num_cpus=2)
    for engine, label in (("hf", "lorafleet serve, engine hf (fp32 base)"), ("vllm", "lorafleet serve, engine vllm (bf16 base)")):
        rows[label] = served_answers(run, examples, engine, args.adapter.resolve())
    ray.shutdown()

    print(f"\n## The QLoRA adapter {args.adapter} on {len(examples)} held-out SQuAD questions ({args.config})\n")
    print("| path | exact match | F1 | answers equal to lorafleet eval's |\n| --- | ---: | ---: | ---: |")
    for label, answers in rows.items():
        m = scored(answers, examples)
        same = sum(a.strip() == r.strip() for a, r in zip(answers, reference, strict=True))
        print(f"| {label} | {m['exact_match']:.1f} | {m['f1']:.1f} | {same} / {len(examples)} |")


if __name__ == "__main__":
    main()
