"""Training throughput: `lorafleet train` (Ray Train, 1 worker) vs a plain HF Trainer + PEFT script.

Same model (SmolLM2-135M-Instruct, 4-bit NF4), same tokenized data, same hyperparameters and
thread count. Steady state: tokens/s between the log at `--skip` steps and the last log, so
model loading, Ray start-up and the first slow steps are left out of both sides. Also the peak
memory (RSS) of a training process with a 4-bit vs an unquantized base.

    python bench/train_throughput.py [--steps 16] [--skip 4] [--threads 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.config import load_config  # noqa: E402

def bench_overrides(out: Path, steps: int, threads: int) -> list[str]:
    return [f"training.output_dir={out}", f"ray.storage_path={out / 'ray'}", f"training.max_steps={steps}", "training.logging_steps=1",
            f"training.eval_steps={steps}", "data.validation_fraction=0.05", "data.demo_rows=400", "training.batch_size=4",
            f"ray.resources_per_worker={{CPU: {threads}}}"]


def steady_tokens_per_second(log_history: list[dict], skip: int) -> float:
    logs = [e for e in log_history if "loss" in e and "num_input_tokens_seen" in e and "train_runtime" in e]
    start = next(e for e in logs if e["step"] >= skip)
    end = logs[-1]
    return (end["num_input_tokens_seen"] - start["num_input_tokens_seen"]) / (end["train_runtime"] - start["train_runtime"])


def run_lorafleet(out: Path, steps: int, skip: int, threads: int) -> float:
    subprocess.run([sys.executable, "-m", "jobs.train", "--config", "configs/demo.yaml", *bench_overrides(out, steps, threads)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return steady_tokens_per_second(json.loads((out / "metrics.json").read_text())["log_history"], skip)


PLAIN_SCRIPT = """
import json, sys, torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer
from jobs.config import load_config
from jobs.data import prepare
from jobs.packaged import packaged_model_path
from jobs.train import training_arguments

torch.set_num_threads(int(sys.argv[3]))
run = load_config("configs/demo.yaml", json.loads(sys.argv[1]))
path = packaged_model_path("smollm2-135m-instruct")
tokenizer = AutoTokenizer.from_pretrained(path)
data = prepare(run.data, tokenizer, "causal", True)
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32) if sys.argv[2] == "4bit" else None
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": "cpu"})
if quant:
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
else:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=run.lora.r, lora_alpha=run.lora.alpha, lora_dropout=run.lora.dropout, target_modules="all-linear", task_type="CAUSAL_LM"))
trainer = Trainer(model=model, args=training_arguments(run, run.training.output_dir, data.eval is not None), train_dataset=data.train,
                  eval_dataset=data.eval, data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
trainer.train()
import resource
print(json.dumps({"log_history": trainer.state.log_history, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_plain(out: Path, steps: int, mode: str, threads: int) -> dict:
    overrides = bench_overrides(out, steps, threads)
    result = subprocess.run([sys.executable, "-c", PLAIN_SCRIPT, json.dumps(overrides), mode, str(threads)], cwd=ROOT, check=True, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip", type=int, default=4, help="steps left out of the steady-state window")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each trainer (Ray worker CPUs)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs, alternating which goes first")
    args = parser.parse_args()
    load_config("configs/demo.yaml")  # fail early on a broken config
    plain_runs, ray_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for repeat in range(args.repeats):
            # Alternate the order: a machine under sustained load slows down, which favours whoever runs first.
            order = ("ray", "plain") if repeat % 2 == 0 else ("plain", "ray")
            for which in order:
                out = tmp / f"{which}-{repeat}"
                if which == "ray":
                    ray_runs.append(run_lorafleet(out, args.steps, args.skip, args.threads))
                else:
                    plain = run_plain(out, args.steps, "4bit", args.threads)
                    plain_runs.append(steady_tokens_per_second(plain["log_history"], args.skip))
        full = run_plain(tmp / "full", max(args.skip + 2, 4), "none", args.threads)
    plain_tps, ray_tps = sum(plain_runs) / len(plain_runs), sum(ray_runs) / len(ray_runs)
    rows = [
        ("plain HF Trainer + PEFT (1 process)", plain_runs, plain_tps, 1.0),
        ("lorafleet train (Ray Train, 1 worker)", ray_runs, ray_tps, ray_tps / plain_tps),
    ]
    print(f"\nSmolLM2-135M-Instruct, QLoRA 4-bit NF4, r={load_config('configs/demo.yaml').lora.r} all-linear, batch 4, {args.threads} thread(s) on "
          f"{os.cpu_count()} cores, steps {args.skip}..{args.steps} (steady state), {args.repeats} run(s) each\n")
    print("| trainer | trained tokens/s (mean) | runs | ratio to plain |\n| --- | --- | --- | --- |")
    print("\n".join(f"| {name} | {mean:,.1f} | {', '.join(f'{r:.1f}' for r in runs)} | {ratio:.2f} |" for name, runs, mean, ratio in rows))
    print("\n| base model in the training process | peak RSS (MB) |\n| --- | --- |")
    print(f"| 4-bit NF4 (QLoRA) | {plain['peak_rss_mb']:,.0f} |\n| unquantized float32 (LoRA) | {full['peak_rss_mb']:,.0f} |")
    print(f"\nratio lorafleet/plain = {ray_tps / plain_tps:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
