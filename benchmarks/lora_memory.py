"""LoRA against full fine-tuning of the same local checkpoint: trainable parameter share, peak memory
and validation perplexity before and after, each mode in a fresh process measured the same way.

The "local checkpoint" is made here: a Llama-architecture model pretrained briefly by kbtune on part_b
of the sample corpus (company, customers, policies, support) and saved with `save_pretrained`, with its
tokenizer beside it. Both modes then fine-tune it on part_a (engineering, manufacturing, products)
through kbtune's own classes (DataPreparation, KBDataModule, CausalLMModule, TrainingLoop) for the same
steps, batch and block; validation is part_a's held-out documents.

Memory: peak RSS (VmHWM) of the child process, and its growth during training over the RSS after the
model was loaded. On a GPU (`--device cuda`) also peak allocated GPU memory and tokens/s.

Standalone: `python benchmarks/lora_memory.py [--quick] [--device cuda] [--json OUT]`."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import kbs

CORPUS = harness.REPO / "data" / "sample_kb"
# A ~12M-parameter Llama: big enough that optimizer state shows in RSS, small enough for 2 CPU cores.
BASE = {
    "n_layer": 6,
    "n_head": 6,
    "n_embd": 384,
    "intermediate_size": 1024,
    "vocab_size": 4096,
    "max_position": 256,
}
MODES = {
    "full": {"lora": None, "learning_rate": 3e-4},
    "lora": {"lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": []}, "learning_rate": 2e-3},
    # LoRA dropout copies each adapted layer's input (kept for the backward): without it, the adapters
    # add almost no activation memory.
    "lora_no_dropout": {
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": []},
        "learning_rate": 2e-3,
    },
}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: ru_maxrss would carry over the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def knowledge_base(workdir: Path, part: str) -> Any:
    from kbtune.ingestion import ingest_folder
    from kbtune.knowledge_base import KBSettings, KnowledgeBase

    kb = KnowledgeBase.connect(
        KBSettings(path=str(workdir / "chroma"), collection=f"bench-{part.replace('_', '-')}")
    )
    ingest_folder(kb, CORPUS / part, embed=kbs.hash_embed)
    return kb


def fit(spec: Any, kb: Any, cache: Path, steps: int, lr: float, block: int, batch: int, device: str,
        checkpoints: Path) -> tuple[Any, Any, float, float]:  # fmt: skip
    """Train `spec` on `kb` for `steps` optimizer steps; (module, prepared data, fit seconds, RSS in MB
    once the model is built and the data prepared, just before training)."""
    import pytorch_lightning as pl

    from kbtune.data.datamodule import KBDataModule
    from kbtune.data.preparation import DataPreparation, DataSettings
    from kbtune.modeling.factory import TokenizerProvider
    from kbtune.modeling.module import CausalLMModule
    from kbtune.training_loop import CallbackSettings, TrainerSettings, TrainingLoop

    provider = TokenizerProvider(spec, cache)
    preparation = DataPreparation(kb, DataSettings(block_size=block, batch_size=batch), provider, cache)
    prepared = preparation.prepare_dataset()
    pl.seed_everything(0, verbose=False)
    module = CausalLMModule(
        provider.resolved_spec().to_dict(), {"learning_rate": lr, "warmup_steps": max(1, steps // 10)}
    )
    trainer = TrainerSettings(
        max_epochs=-1, max_steps=steps, val_check_interval=steps, limit_val_batches=0, enable_progress_bar=False,
        accelerator="gpu" if device == "cuda" else "cpu", log_every_n_steps=max(1, steps // 5),
    )  # fmt: skip
    loop = TrainingLoop(trainer, CallbackSettings(save_top_k=0, save_last=False), checkpoints)
    rss = current_rss_mb()
    t0 = time.perf_counter()
    loop.train(module, KBDataModule(preparation, batch, seed=0), loggers=[])
    return module, prepared, time.perf_counter() - t0, rss


def val_perplexity(model: Any, blocks: Any, device: str, batch: int = 8) -> float:
    """Token-weighted perplexity over the validation blocks (every position predicted, as in training)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(blocks), batch):
            x = torch.as_tensor(blocks[start : start + batch], dtype=torch.long, device=device)
            loss = model(input_ids=x, labels=x).loss
            n = x.shape[0] * (x.shape[1] - 1)
            total, count = total + float(loss) * n, count + n
    return math.exp(total / count)


# -- the base checkpoint (parent process) ---------------------------------------------------------
def make_base(workdir: Path, steps: int, block: int, batch: int, device: str) -> Path:
    from kbtune.model_manager import save_model_dir
    from kbtune.modeling.factory import ModelSpec

    spec = ModelSpec(name="bench-base", **BASE)
    kb = knowledge_base(workdir, "part_b")
    module, prepared, seconds, _ = fit(
        spec, kb, workdir / "cache", steps, 1e-3, block, batch, device, workdir / "ckpt-base"
    )
    harness.log(f"pretrained the base for {steps} steps in {seconds:.0f}s")
    directory = workdir / "base"
    save_model_dir(module.model, prepared.tokenizer, spec.to_dict(), directory)
    return directory


# -- one fine-tuning mode (child process) ---------------------------------------------------------
def child(args: dict[str, Any]) -> None:
    from dataclasses import replace

    import torch

    from kbtune.modeling.factory import LoraSpec, ModelSpec, build_model
    from kbtune.modeling.lora import trainable_parameters

    mode, device, workdir = MODES[args["mode"]], args["device"], Path(args["workdir"])
    lora = LoraSpec(**{**mode["lora"], "target_modules": ()}) if mode["lora"] else None
    spec = ModelSpec(name="local", source="local", path=args["base"], lora=lora)
    kb = knowledge_base(workdir, "part_a")
    module, prepared, seconds, loaded_rss = fit(spec, kb, workdir / f"cache-{args['mode']}", args["steps"],
                                                mode["learning_rate"], args["block"], args["batch"], device,
                                                workdir / f"ckpt-{args['mode']}")  # fmt: skip
    # Read before anything else is loaded: the peak of loading plus training, nothing after.
    peak = peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    trainable, total = trainable_parameters(module.model)
    after = val_perplexity(module.model.to(device), prepared.val, device)
    before = val_perplexity(build_model(replace(spec, lora=None)).to(device), prepared.val, device)
    print(json.dumps({
        "mode": args["mode"], "trainable": trainable, "total": total, "share": trainable / total,
        "loaded_rss_mb": loaded_rss, "peak_rss_mb": peak, "train_rss_growth_mb": peak - loaded_rss,
        "gpu_peak_mb": gpu_peak, "val_ppl_before": before, "val_ppl_after": after,
        "tokens_per_s": args["steps"] * args["batch"] * args["block"] / seconds, "fit_s": seconds,
        "learning_rate": mode["learning_rate"], "val_blocks": int(len(prepared.val)),
    }))  # fmt: skip


def table(rows: list[dict[str, Any]], settings: dict[str, Any], load: dict[str, Any]) -> str:
    head = ["mode", "trainable params", "share", "peak RSS MB", "RSS growth in training MB",
            "grads + AdamW state MB (computed)", "val ppl before", "val ppl after", "tokens/s"]  # fmt: skip
    if any(r["gpu_peak_mb"] is not None for r in rows):
        head.append("peak GPU MB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["mode"], f"{r['trainable']:,} / {r['total']:,}", f"{100 * r['share']:.2f}%", f"{r['peak_rss_mb']:.0f}",
                 f"{r['train_rss_growth_mb']:.0f}", f"{r['trainable'] * 12 / 2**20:.0f}", f"{r['val_ppl_before']:.1f}", f"{r['val_ppl_after']:.1f}", f"{r['tokens_per_s']:.0f}"]  # fmt: skip
        if len(head) > len(cells):
            cells.append(f"{r['gpu_peak_mb']:.0f}" if r["gpu_peak_mb"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"settings: {json.dumps(settings)}; learning rates full {MODES['full']['learning_rate']}, "
        f"LoRA {MODES['lora']['learning_rate']} (r=8, alpha=16, on q/k/v/o/gate/up/down_proj); precision: "
        f"kbtune's default (bf16-mixed where supported); load average during the run {load['loadavg']}, "
        f"other processes' CPU {load['other_cpu_percent']}%"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer steps (a smoke run, numbers not meaningful)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--workdir", type=Path, help="keep the KBs and the base checkpoint here (reused when present)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.quick:
        args.pretrain_steps, args.steps = 10, 4
    settings = {k: getattr(args, k) for k in ("device", "pretrain_steps", "steps", "block", "batch")}
    with tempfile.TemporaryDirectory(prefix="kbtune-lora-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        base = workdir / "base"
        if not (base / "model.safetensors").exists():
            base = make_base(workdir, args.pretrain_steps, args.block, args.batch, args.device)
        rows = []
        load = harness.other_load()
        for mode in MODES:
            payload = json.dumps({"mode": mode, "base": str(base), "workdir": str(workdir), **settings})
            _, proc = harness.run_timed(
                [harness.PYTHON, __file__, "--child", payload],
                env=harness.bench_env(TOKENIZERS_PARALLELISM="false"),
            )
            if proc.returncode != 0:
                raise SystemExit(f"{mode} run failed:\n{proc.stderr[-4000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            harness.log(f"{mode}: {rows[-1]}")
    print(table(rows, settings, load))
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "rows": rows, "load": load}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
