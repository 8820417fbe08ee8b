#!/usr/bin/env python
"""With and without SiFT on GLUE, several seeds, paired: the experiment behind the SiFT table of docs/benchmarks.md.

    # run every (task, seed, arm) not yet done, two processes at a time, then print the table
    OMP_NUM_THREADS=1 python experiments/sift_glue_experiment.py --data_dir ../shared/data/glue \\
        --spm ../shared/data/tokenizers/deberta-v3/spm.model --output_dir outputs/sift-glue

    # only print the table of the runs done so far (markdown)
    python experiments/sift_glue_experiment.py --output_dir outputs/sift-glue --summary

Each run is `scripts/run_glue.py` (called in-process by `--parallel` worker processes, one thread each) with the
`tiny` preset from scratch (no pretraining), the official DeBERTa-v3 SentencePiece vocabulary, 2 epochs, 64 tokens,
the from-scratch recipe of configuration/glue/from_scratch.json, a random training subset per seed (TASKS), and the
same arguments in both arms except `--sift --sift_lambda L`. Runs with the same seed share the initial weights, the
training subset and the data order, so the per-seed difference is paired. SST-2 runs first (the one task a model
this small learns from scratch here), then seed by seed the others. A run whose folder exists is skipped:
restarting the driver resumes the experiment. The saved weights are deleted after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = {  # task -> (the official metric reported, training examples per run: a random subset per seed)
    "sst2": ("accuracy", 6000),
    "mrpc": ("f1", 1000),
    "rte": ("accuracy", 1000),
    "cola": ("matthews_correlation", 1000),
    "stsb": ("pearson", 1000),
}


def run_directory(output_dir: Path, task: str, arm: str, seed: int) -> Path:
    return output_dir / f"{task}-{arm}-seed{seed}"


def run_arguments(args, task: str, arm: str, seed: int, tokenizer: str) -> list[str]:
    argv = ["--task", task, "--data_dir", args.data_dir, "--model_preset", "tiny", "--tokenizer", tokenizer,
            "--seed", str(seed), "--max_train_samples", str(TASKS[task][1] if args.max_train_samples is None
                                                             else args.max_train_samples),
            "--max_predict_samples", "1",  # test splits are not used: do not tokenize them
            "--max_seq_length", str(args.max_seq_length), "--num_train_epochs", str(args.epochs),
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--torch_num_threads", "1",
            "--dataloader_pin_memory", "False", "--disable_tqdm", "True",
            "--output_dir", str(run_directory(Path(args.output_dir), task, arm, seed))]
    if arm == "sift":
        argv += ["--sift", "--sift_lambda", str(args.sift_lambda), "--sift_regression_mode", args.sift_regression_mode]
    return argv


def tokenizer_folder(args) -> str:
    folder = Path(args.output_dir) / "tokenizer-deberta-v3"
    if not (folder / "tokenizer.json").exists():
        sys.path.insert(0, str(REPO))
        from modeling_deberta_custom.training.tokenization import write_spm_tokenizer_folder

        write_spm_tokenizer_folder(args.spm, folder)
    return str(folder)


def jobs(args) -> list[tuple[str, str, int]]:
    """SST-2 first, then seeds outermost; both arms of a (task, seed) together: an interrupted experiment leaves
    complete pairs."""
    first = [task for task in args.tasks if task == "sst2"]  # the one task a tiny model learns from scratch here
    rest = [task for task in args.tasks if task != "sst2"]
    return [(task, arm, seed) for tasks in (first, rest) for seed in args.seeds for task in tasks for arm in args.arms]


def worker(args) -> None:
    """Run jobs in this process (no start-up cost per run), claiming each by creating its folder: several workers
    share the list without a coordinator."""
    sys.path.insert(0, str(REPO / "scripts"))
    import run_glue

    tokenizer = tokenizer_folder(args)
    for task, arm, seed in jobs(args):
        directory = run_directory(Path(args.output_dir), task, arm, seed)
        try:
            directory.mkdir(parents=True)
        except FileExistsError:
            continue  # done, or claimed by another worker
        start = time.time()
        try:
            run_glue.main(run_arguments(args, task, arm, seed, tokenizer))
        except Exception:  # report and go on: the summary lists only finished pairs
            traceback.print_exc()
        for weights in directory.glob("*.safetensors"):
            weights.unlink()
        print(f"{time.strftime('%H:%M:%S')} {task} {arm} seed {seed}: {time.time() - start:.0f} s", flush=True)


def run_all(args) -> None:
    tokenizer_folder(args)  # once, before the workers start
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    argv = [a for a in sys.argv[1:] if a != "--summary"]
    processes = []
    for index in range(args.parallel):
        log = open(Path(args.output_dir) / f"worker{index}.log", "a", encoding="utf-8")  # noqa: SIM115
        processes.append(subprocess.Popen([sys.executable, __file__, *argv, "--worker"], stdout=log,
                                          stderr=subprocess.STDOUT, env=env, cwd=REPO))
        time.sleep(5)  # let the first claim its job
    for process in processes:
        process.wait()


def summary(args) -> str:
    lines = ["| task (metric, dev) | train examples | without SiFT | with SiFT | SiFT - without (paired) | seeds |"
             " sift_loss | time per run (without / with) |",
             "|---|---|---|---|---|---|---|---|"]
    for task in args.tasks:
        metric = TASKS[task][0]
        pairs, losses, seconds, examples = [], [], {"base": [], "sift": []}, None
        for seed in args.seeds:
            values = {}
            for arm in ("base", "sift"):
                path = run_directory(Path(args.output_dir), task, arm, seed) / "results.json"
                if not path.exists():
                    break
                results = json.loads(path.read_text())
                values[arm] = 100 * next(iter(results["eval"].values()))[f"eval_{metric}"]
                seconds[arm].append(results["train"]["train_runtime"])
                examples = results["num_train_examples"]
                if arm == "sift":
                    losses.append(results["train"].get("train_sift_loss", float("nan")))
            if len(values) == 2:
                pairs.append((values["base"], values["sift"]))
        if not pairs:
            continue

        def mean_std(xs):
            return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"

        base, sift = [p[0] for p in pairs], [p[1] for p in pairs]
        lines.append(f"| {task} ({metric}) | {examples} | {mean_std(base)} | {mean_std(sift)} | "
                     f"{mean_std([s - b for b, s in pairs])} | {len(pairs)} | {statistics.mean(losses):.3f} | "
                     f"{statistics.mean(seconds['base']):.0f} s / {statistics.mean(seconds['sift']):.0f} s |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--spm", default=str(REPO.parent / "shared" / "data" / "tokenizers" / "deberta-v3" / "spm.model"))
    parser.add_argument("--output_dir", default="outputs/sift-glue")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--arms", nargs="+", default=["base", "sift"], choices=["base", "sift"])
    parser.add_argument("--sift_lambda", type=float, default=5.0)
    parser.add_argument("--sift_regression_mode", default="authors", choices=["authors", "zero"],
                        help="STS-B's one-logit head (docs/sift.md); the table of 2026-11-30 ran with zero")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=2, help="Runs at a time (each on one thread).")
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help="Training examples per run for every task (default: TASKS).")
    parser.add_argument("--summary", action="store_true", help="Only print the table of the finished runs.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args)
        return
    if not args.summary:
        run_all(args)
    print(summary(args))


if __name__ == "__main__":
    main()
