"""Training throughput: `lorafleet train` (Ray Train, 1 worker) vs a plain HF Trainer + PEFT script.

Same model (SmolLM2-135M-Instruct, 4-bit NF4), same tokenized data and batches, same
hyperparameters and thread count. Steady state: steps after `--skip`, so model loading, Ray
start-up and the first slow steps are left out of both sides. Also the peak memory (RSS) of a
training process with a 4-bit vs an unquantized base. A third row runs the plain script while an
idle Ray Train run of the same shape shares the machine: what Ray's own processes take from a
trainer whose threads use every core, apart from the training path.

Two estimates: the mean over whole runs, and the fastest repeat of each step. Both trainers see
the same batches in the same order, so step i costs the same work on both sides; the machine this
was written on has slow phases (every step 15-20% slower for minutes, whichever trainer runs),
and the fastest repeat of each step leaves those out while keeping any cost Ray adds to every
step (its background processes wake many times a second, so every 5 s step pays them).

    python bench/train_throughput.py [--steps 16] [--skip 4] [--threads 2] [--repeats 1]
    python bench/train_throughput.py --packing [--steps 9]   # padded vs padding-free batches, SQuAD config

`--packing` trains the SQuAD config (configs/squad-smollm2.yaml, the shared subset) twice with
`lorafleet train`, the same batches, `training.packing: none` then `padding_free`: non-padding tokens
trained per second (Trainer runtime) and the eval loss on the 54 held-out questions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import markdown_row, target, write_result  # noqa: E402  (bench/ is this script's folder)

from jobs.config import load_config  # noqa: E402


def bench_overrides(out: Path, steps: int, threads: int) -> list[str]:
    return [f"training.output_dir={out}", f"ray.storage_path={out / 'ray'}", f"training.max_steps={steps}", "training.logging_steps=1",
            f"training.eval_steps={steps}", "data.validation_fraction=0.05", "data.demo_rows=400", "training.batch_size=4",
            f"ray.resources_per_worker={{CPU: {threads}}}"]


StepTimes = dict[int, tuple[int, float]]  # step -> (non-padding tokens trained in it, seconds it took)


def step_times(log_history: list[dict], skip: int) -> StepTimes:
    logs = [e for e in log_history if "loss" in e and "num_input_tokens_seen" in e and "train_runtime" in e]
    return {b["step"]: (b["num_input_tokens_seen"] - a["num_input_tokens_seen"], b["train_runtime"] - a["train_runtime"])
            for a, b in zip(logs, logs[1:]) if a["step"] >= skip}


def tokens_per_second(steps: StepTimes) -> float:
    return sum(tokens for tokens, _ in steps.values()) / sum(seconds for _, seconds in steps.values())


def fastest_of_each_step(runs: list[StepTimes]) -> StepTimes:
    return {step: (runs[0][step][0], min(run[step][1] for run in runs)) for step in runs[0]}


def run_lorafleet(out: Path, steps: int, skip: int, threads: int) -> StepTimes:
    subprocess.run([sys.executable, "-m", "jobs.train", "--config", "configs/demo.yaml", *bench_overrides(out, steps, threads)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return step_times(json.loads((out / "metrics.json").read_text())["log_history"], skip)


PLAIN_SCRIPT = """
import json, sys, torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer
from jobs.config import load_config
from jobs.data.driver import prepare
from jobs.packaged import packaged_model_path
from jobs.prompting import Prompting
from jobs.train import training_arguments

torch.set_num_threads(int(sys.argv[3]))
run = load_config("configs/demo.yaml", json.loads(sys.argv[1]))
path = packaged_model_path("smollm2-135m-instruct")
tokenizer = AutoTokenizer.from_pretrained(path)
data = prepare(run.data, Prompting(tokenizer, "causal", True))
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


IDLE_RAY_SCRIPT = """
import pathlib, sys, time, ray.train, ray.train.torch
def idle(config):
    pathlib.Path(config["ready"]).touch()
    while not pathlib.Path(config["stop"]).exists():
        time.sleep(0.5)
ray.train.torch.TorchTrainer(idle, train_loop_config={"ready": sys.argv[1], "stop": sys.argv[2]},
                             scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                             run_config=ray.train.RunConfig(storage_path=sys.argv[3])).fit()
"""


def run_plain_beside_idle_ray(out: Path, steps: int, threads: int) -> dict:
    """The plain script while an idle `lorafleet train`-shaped Ray Train run (embedded Ray, controller,
    helper actors, one sleeping worker) shares the machine: what Ray's own processes cost a trainer."""
    out.mkdir(parents=True)
    ready, stop = out / "ray-ready", out / "ray-stop"
    idle = subprocess.Popen([sys.executable, "-c", IDLE_RAY_SCRIPT, str(ready), str(stop), str(out / "ray")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not ready.exists():
            if idle.poll() is not None or time.time() > deadline:
                raise SystemExit("the idle Ray Train run did not start")
            time.sleep(1)
        return run_plain(out / "plain", steps, "4bit", threads)
    finally:
        stop.touch()
        idle.wait(timeout=120)


SQUAD = ROOT / "configs" / "squad-smollm2.yaml"


def packing_rows(steps: int, args: argparse.Namespace) -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for packing in ("none", "padding_free"):
            out = Path(tmp) / packing
            overrides = [f"training.output_dir={out}", f"ray.storage_path={out / 'ray'}", f"training.max_steps={steps}",
                         f"training.eval_steps={steps}", "eval.during_training_samples=0", "tune.metric=eval_loss", f"training.packing={packing}"]
            subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(SQUAD), *overrides], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            m = json.loads((out / "metrics.json").read_text())
            rows[packing] = (m["tokens_seen"], m["train_runtime_s"], m["final_eval_loss"], m["steps"])
    print(f"\nSmolLM2-135M-Instruct QLoRA on the SQuAD subset (configs/squad-smollm2.yaml), {steps} steps of batch 8, {os.cpu_count()} cores\n")
    # Both runs train the same batches, so the padded run's count is the non-padding tokens of both. The Trainer's
    # own count of a packed batch (no attention mask) leaves out every token equal to the pad id, and SmolLM2's pad
    # token is its end-of-turn token: 3 per example fewer, though they are trained.
    tokens = rows["none"][0]
    print("| training.packing | non-padding tokens trained | Trainer's own count | Trainer runtime (s) | non-padding tokens/s | eval loss (54 held out) |")
    print("| --- | --- | --- | --- | --- | --- |")
    table = []
    for packing, (counted, runtime, eval_loss, _) in rows.items():
        table.append({"training.packing": packing, "non-padding tokens trained": f"{tokens:,}", "Trainer's own count": f"{counted:,}",
                      "Trainer runtime (s)": f"{runtime:.1f}", "non-padding tokens/s": f"{tokens / runtime:,.1f}", "eval loss (54 held out)": f"{eval_loss:.4f}"})
        print(markdown_row(table[-1]))
    (_, r0, e0, _), (_, r1, e1, _) = rows["none"], rows["padding_free"]
    print(f"\nratio padding_free/none: {r0 / r1:.3f} (target >= 1.2); eval loss difference {abs(e1 - e0) / e0:.2%} (target <= 1%)")
    write_result("train_throughput_packing", args, table, [
        target("speed, padding_free / none (non-padding tokens/s)", r0 / r1, ">=", 1.2, "x"),
        target("eval loss difference, padding_free vs none", 100 * abs(e1 - e0) / e0, "<=", 1, "%"),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip", type=int, default=4, help="steps left out of the steady-state window")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each trainer (Ray worker CPUs)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of runs, rotating which goes first")
    parser.add_argument("--packing", action="store_true", help="padded vs padding-free batches on the SQuAD config instead")
    args = parser.parse_args()
    if args.packing:
        return packing_rows(args.steps if args.steps != 16 else 9, args)
    load_config("configs/demo.yaml")  # fail early on a broken config
    runs: dict[str, list[StepTimes]] = {"plain": [], "ray": [], "plain beside idle ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for repeat in range(args.repeats):
            # Rotate the order: a machine under sustained load slows down, which favours whoever runs first.
            order = list(runs)[repeat % 3:] + list(runs)[: repeat % 3]
            for which in order:
                out = tmp / f"{which.replace(' ', '-')}-{repeat}"
                if which == "ray":
                    runs[which].append(run_lorafleet(out, args.steps, args.skip, args.threads))
                else:
                    plain = run_plain(out, args.steps, "4bit", args.threads) if which == "plain" else run_plain_beside_idle_ray(out, args.steps, args.threads)
                    runs[which].append(step_times(plain["log_history"], args.skip))
        full = run_plain(tmp / "full", max(args.skip + 2, 4), "none", args.threads)
    if {s: t for s, (t, _) in runs["plain"][0].items()} != {s: t for s, (t, _) in runs["ray"][0].items()}:
        raise SystemExit("the two trainers trained different batches; the comparison is void")
    per_run = {which: [tokens_per_second(run) for run in trainer_runs] for which, trainer_runs in runs.items()}
    mean = {which: sum(values) / len(values) for which, values in per_run.items()}
    fastest = {which: tokens_per_second(fastest_of_each_step(trainer_runs)) for which, trainer_runs in runs.items()}
    print(f"\nSmolLM2-135M-Instruct, QLoRA 4-bit NF4, r={load_config('configs/demo.yaml').lora.r} all-linear, batch 4, {args.threads} thread(s) on "
          f"{os.cpu_count()} cores, steps {args.skip}..{args.steps} (steady state), {args.repeats} run(s) each\n")
    print("| trainer | trained tokens/s, mean of runs | runs | fastest repeat of each step |\n| --- | --- | --- | --- |")
    names = {"plain": "plain HF Trainer + PEFT (1 process)", "ray": "lorafleet train (Ray Train, 1 worker)",
             "plain beside idle ray": "plain, beside an idle Ray Train run"}
    throughput = []
    for which, name in names.items():
        throughput.append({"trainer": name, "trained tokens/s, mean of runs": f"{mean[which]:,.1f}", "runs": ", ".join(f"{r:.1f}" for r in per_run[which]),
                           "fastest repeat of each step": f"{fastest[which]:,.1f}"})
        print(markdown_row(throughput[-1]))
    print("\n| base model in the training process | peak RSS (MB) |\n| --- | --- |")
    memory = [{"base model in the training process": "4-bit NF4 (QLoRA)", "peak RSS (MB)": f"{plain['peak_rss_mb']:,.0f}"},
              {"base model in the training process": "unquantized float32 (LoRA)", "peak RSS (MB)": f"{full['peak_rss_mb']:,.0f}"}]
    print("\n".join(markdown_row(row) for row in memory))
    print(f"\nratio lorafleet/plain: mean of runs {mean['ray'] / mean['plain']:.3f}, fastest repeat of each step {fastest['ray'] / fastest['plain']:.3f} (target >= 0.95)")
    print(f"ratio plain beside an idle Ray Train run / plain alone: {mean['plain beside idle ray'] / mean['plain']:.3f} (Ray's own processes, not the training path)")
    write_result("train_throughput", args, {"Trained tokens per second, steady state": throughput, "Peak memory of the training process": memory}, [
        target("lorafleet / plain trained tokens/s, mean of runs", mean["ray"] / mean["plain"], ">=", 0.95),
        target("lorafleet / plain trained tokens/s, fastest repeat of each step", fastest["ray"] / fastest["plain"], ">=", 0.95),
    ])


if __name__ == "__main__":
    main()
