"""Training throughput: kbtune's real training path against a plain PyTorch loop and transformers.Trainer
on the same model, data, batch and block, and kbtune's default configuration against the HF Trainer's
defaults; tokens/s, model-FLOP utilisation against this machine's measured matmul peak, and val/loss
after the same number of tokens.

Variants (one fresh model from the same initial weights each, S = W + N optimizer steps, timed over
the last N: warmup steps are skipped):
  kbtune       TrainingService.train_model on a plan from project.open_project (KBDataModule,
               CausalLMModule, TrainingLoop's Trainer with its default callbacks, progress bar, MLflow
               logging), its default precision (trainer.precision=auto) and optimizer settings;
  plain        forward with labels, backward, clip, AdamW step (fused, as kbtune), LR schedule: nothing else;
  hf_trainer   transformers.Trainer, report_to none, kbtune's precision and optimizer settings;
  hf_defaults  transformers.Trainer with its own defaults (fp32, lr 5e-5, ...), report_to none.

Standalone: `python benchmarks/training.py [--quick]`."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import kbs

FLOPS_FORMULA = (
    "model FLOPs per token = 6*N + 6*n_layer*n_embd*block (N = parameters, the tied embedding counted once "
    "as the LM head's matmul; the second term is causal attention's QK^T and AV, forward + backward: half "
    "of the 12*n_layer*n_embd*block that PaLM's MFU counts for full attention, because a causal mask skips "
    "the upper triangle); MFU = tokens/s * FLOPs per token / measured peak matmul FLOP/s of the precision "
    "the run uses"
)

FLOPS_SHORT = "6N + causal attention FLOPs per token"

# The peak is the best rate over square matmuls AND the shapes a training step of these models runs
# ([batch*block, d] x [d, 3d] and their transposes): on AMX the rectangular ones beat the squares
# (3.4 vs 2.5 TFLOP/s on a 2-core Xeon), and a peak that leaves them out would flatter the MFU.
PEAK_SHAPES = (
    [(n, n, n) for n in (512, 1024, 2048)]
    + [(2048, d, f) for d in (256, 512, 768) for f in (d, 3 * d)]
    + [(2048, 3 * d, d) for d in (256, 512, 768)]
    + [(d, 2048, 3 * d) for d in (256, 768)]
)


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block: int) -> int:
    return 6 * n_params + 6 * n_layer * n_embd * block


def matmul_peak_gflops(dtype_name: str, seconds: float = 0.3) -> float:
    """The best matmul rate this machine reaches in a dtype (GFLOP/s), over PEAK_SHAPES."""
    import torch

    dtype = getattr(torch, dtype_name)
    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        for _ in range(2):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


class Context:
    """Everything the variants share: the plan kbtune trains with, its prepared blocks, the model spec.

    `timed`: the throughput runs must fit in one epoch, so no validation falls inside the timed window;
    the loss comparison runs for hundreds of steps over several epochs and is not timed."""

    def __init__(self, workdir: Path, quick: bool, warmup: int, measured: int, overrides: tuple[str, ...] = (),
                 timed: bool = True):  # fmt: skip
        from kbtune.project import open_project

        kb = kbs.sample_kb(workdir)
        self.root = workdir / "training"
        self.steps, self.warmup = warmup + measured, warmup
        self.rounds = 0
        base = [
            f"paths.root={self.root}", f"kb.path={kb['path']}", f"kb.collection={kb['collection']}",
            f"model={'tiny' if quick else 'small'}", f"data.block_size={64 if quick else 256}",
            f"trainer.max_steps={self.steps}", "register=false",
            # Every variant runs on the CPU, the machine the targets are for (a GPU would take kbtune's "auto").
            "trainer.accelerator=cpu",
        ]  # fmt: skip
        project = open_project([*base, *overrides])
        self.plan, self.service = project.plan(), project.service
        self.preparation = self.service.prepare_training_data(self.plan)
        self.prepared = self.preparation.prepare_dataset()
        self.spec = self.preparation.tokenizer_factory.resolved_spec()
        self.batch, self.block = self.plan.data.batch_size, self.plan.data.block_size
        from kbtune.training_loop import resolve_precision

        self.precision = resolve_precision(self.plan.trainer)
        self.steps_per_epoch = len(self.prepared.train) // self.batch
        if timed and self.steps > self.steps_per_epoch:
            raise RuntimeError(
                f"{self.steps} steps exceed one epoch ({self.steps_per_epoch}): validation would fall in the window"
            )
        self.val = self.prepared.val[: 16 if quick else 64]

    def tokens_per_s(self, stamps: list[float]) -> float:
        """Steps warmup..S-1: stamp i is taken when step i ends, so the window holds S - W whole steps."""
        if len(stamps) < self.steps:
            raise RuntimeError(f"only {len(stamps)} of {self.steps} steps were timed")
        return (
            (self.steps - self.warmup)
            * self.batch
            * self.block
            / (stamps[self.steps - 1] - stamps[self.warmup - 1])
        )

    def new_model(self) -> Any:
        from kbtune.modeling.factory import build_model

        return build_model(self.spec)

    def flops_per_token(self) -> int:
        model = self.new_model()
        n_params = sum(p.numel() for p in model.parameters())
        return flops_per_token(n_params, model.config.num_hidden_layers, model.config.hidden_size, self.block)

    def val_loss(self, model: Any) -> float:
        """Mean next-token loss on the same validation blocks for every variant, in fp32."""
        import torch

        from kbtune.modeling.loss import token_stats

        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(self.val), self.batch):
                ids = torch.from_numpy(self.val[start : start + self.batch].astype("int64"))
                stats = token_stats(model(input_ids=ids).logits, ids)
                total, count = total + float(stats.nll_sum), count + int(stats.tokens)
        model.train()
        return total / count


def run_kbtune(ctx: Context) -> dict[str, float]:
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.module: Any = None

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            self.stamps.append(time.perf_counter())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.module = pl_module

    timer = StepTimer()
    callbacks: list[Any] = [timer]
    if importlib.util.find_spec("kbtune.progress"):
        # The progress reporting a worker adds (progress.json, the graceful stop, RNG state in checkpoints).
        from kbtune.progress import ProgressCallback, ResumeState
        from kbtune.session_files import SessionFiles

        ctx.rounds += 1
        callbacks += [ProgressCallback(SessionFiles(ctx.root / "progress" / str(ctx.rounds))), ResumeState()]
    outcome = ctx.service.train_model(ctx.plan, extra_callbacks=callbacks, preparation=ctx.preparation)
    sample = {"tokens_per_s": ctx.tokens_per_s(timer.stamps), "val_loss": ctx.val_loss(timer.module.model)}
    discard_run_files(ctx, outcome.session.id)
    return sample


def discard_run_files(ctx: Context, session_id: str) -> None:
    """Remove what a measured run wrote that nothing reads again: its checkpoints (best and last, with
    the optimizer state) and its saved model. A ~100M model's take 2.2 GB per run; a full benchmark
    runs kbtune some sixty times, and kept they filled the disk (75 GB). The records stay."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from kbtune.model_manager import MODEL_ARTIFACT

    shutil.rmtree(ctx.service.layout.files(session_id).checkpoints, ignore_errors=True)
    uri = urlparse(ctx.service.store.artifact_uri(session_id, MODEL_ARTIFACT))
    if uri.scheme in ("", "file"):
        shutil.rmtree(url2pathname(uri.path), ignore_errors=True)


def optimizer_like_kbtune(ctx: Context, model: Any) -> tuple[Any, Any]:
    import torch

    from kbtune.modeling.optim import lr_lambda

    o = ctx.plan.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=o.eps, fused=True,
    )  # fmt: skip
    warmup = min(o.warmup_steps, ctx.steps - 1)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, warmup, ctx.steps, o.min_lr_ratio)
    )


def run_plain(ctx: Context) -> dict[str, float]:
    """The loop a competent user writes by hand: the model's own loss (labels=ids), backward, clip,
    fused AdamW, the same schedule, a fresh shuffle each epoch. Nothing kbtune adds."""
    import torch

    torch.manual_seed(ctx.plan.seed)
    model = ctx.new_model()
    model.train()
    opt, sched = optimizer_like_kbtune(ctx, model)
    data = torch.from_numpy(ctx.prepared.train.astype("int64"))
    shuffle = torch.Generator().manual_seed(ctx.plan.seed)
    bf16 = ctx.precision.startswith("bf16")
    clip = ctx.plan.trainer.gradient_clip_val
    stamps, order = [], None
    for step in range(ctx.steps):
        i = step % ctx.steps_per_epoch
        if i == 0:
            order = torch.randperm(len(data), generator=shuffle)
        ids = data[order[i * ctx.batch : (i + 1) * ctx.batch]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return {"tokens_per_s": ctx.tokens_per_s(stamps), "val_loss": ctx.val_loss(model)}


def run_hf(ctx: Context, defaults: bool) -> dict[str, float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from kbtune.data.datamodule import BlockDataset

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamps.append(time.perf_counter())

    o = ctx.plan.optim
    with tempfile.TemporaryDirectory(dir=ctx.root) as out:
        # The optimizer is pinned: fused AdamW as kbtune's, not whatever the installed version defaults to.
        common = {"output_dir": out, "max_steps": ctx.steps, "per_device_train_batch_size": ctx.batch,
                  "report_to": "none", "seed": ctx.plan.seed, "save_strategy": "no", "use_cpu": True,
                  "optim": "adamw_torch_fused"}  # fmt: skip
        if defaults:
            args = TrainingArguments(**common)
        else:
            args = TrainingArguments(
                **common, learning_rate=o.learning_rate, weight_decay=o.weight_decay, adam_beta1=o.beta1,
                adam_beta2=o.beta2, adam_epsilon=o.eps, max_grad_norm=ctx.plan.trainer.gradient_clip_val,
                warmup_steps=min(o.warmup_steps, ctx.steps - 1), lr_scheduler_type="cosine_with_min_lr",
                lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio}, bf16=ctx.precision.startswith("bf16"),
            )  # fmt: skip
        timer = StepTimer()
        model = ctx.new_model()
        Trainer(
            model=model, args=args, train_dataset=BlockDataset(ctx.prepared.train), callbacks=[timer]
        ).train()
    return {"tokens_per_s": ctx.tokens_per_s(timer.stamps), "val_loss": ctx.val_loss(model)}


def fmt_tps(stats: dict[str, Any]) -> str:
    return f"{stats['median']:,.0f} tok/s ({stats['min']:,.0f}..{stats['max']:,.0f})"


def run(workdir: Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    import torch

    from kbtune.host_memory import reuse_freed_memory

    # kbtune's training sets glibc to keep freed memory on its first fit, for the whole process. Set
    # here first, every variant (the plain loop and the HF Trainer too) runs with it from its first
    # run: otherwise the variants before kbtune's first run page-fault their memory back in every step
    # and the ones after do not (the plain loop: ~4,000 vs ~8,000 tok/s on model=small in bf16, run
    # of 2026-12-03). What the setting is worth is measured in the profile section, in fresh processes.
    reuse_freed_memory()

    rounds = rounds or (1 if quick else 3)
    warmup, measured = (3, 6) if quick else (5, 25)
    peak_s = 0.05 if quick else 0.3
    ctx = Context(workdir, quick, warmup, measured)
    fp32 = Context(workdir, quick, warmup, measured, overrides=("trainer.precision=32-true",))
    peaks = harness.interleave({"fp32": lambda: {"gflops": matmul_peak_gflops("float32", peak_s)},
                                "bf16": lambda: {"gflops": matmul_peak_gflops("bfloat16", peak_s)}}, rounds, "peak")  # fmt: skip
    peak = {name: max(s["gflops"] for s in runs) for name, runs in peaks.items()}
    samples = harness.interleave(
        {
            "kbtune": lambda: run_kbtune(ctx),
            "kbtune_fp32": lambda: run_kbtune(fp32),
            "plain": lambda: run_plain(ctx),
            "hf_trainer": lambda: run_hf(ctx, defaults=False),
            "hf_defaults": lambda: run_hf(ctx, defaults=True),
        },
        rounds, "training",
    )  # fmt: skip
    fpt = ctx.flops_per_token()
    precision = {"kbtune": ctx.precision, "kbtune_fp32": fp32.precision, "plain": ctx.precision,
                 "hf_trainer": ctx.precision, "hf_defaults": "32-true"}  # fmt: skip
    for name, runs in samples.items():
        dtype = "bf16" if precision[name].startswith("bf16") else "fp32"
        for sample in runs:
            sample["mfu_percent"] = 100 * sample["tokens_per_s"] * fpt / (peak[dtype] * 1e9)
    s = harness.summarise(samples)

    # The loss comparison: identical settings for hundreds of steps past the warmup, so it can fail.
    loss_steps = ctx.plan.optim.warmup_steps + (20 if quick else 300)
    # Enough epochs that max_steps ends kbtune's run (the default 3 epochs would stop it first).
    epochs = f"trainer.max_epochs={loss_steps // ctx.steps_per_epoch + 2}"
    long = {"kbtune": Context(workdir, quick, 1, loss_steps - 1, (epochs,), timed=False),
            "kbtune_fp32": Context(workdir, quick, 1, loss_steps - 1, (epochs, "trainer.precision=32-true"), timed=False)}  # fmt: skip
    converged = harness.interleave(
        {
            "kbtune": lambda: run_kbtune(long["kbtune"]),
            "plain": lambda: run_plain(long["kbtune"]),
            "hf_trainer": lambda: run_hf(long["kbtune"], defaults=False),
            "kbtune_fp32": lambda: run_kbtune(long["kbtune_fp32"]),
        },
        1, "loss",
    )  # fmt: skip
    c = harness.summarise(converged)

    same = f"identical settings ({ctx.precision})"
    rows = [harness.row("training", same, "plain", "throughput", "tok/s", s["plain"]["tokens_per_s"])]
    for name in ("kbtune", "hf_trainer"):
        rows.append(harness.row("training", same, name, "throughput", "tok/s", s[name]["tokens_per_s"],
                                s["plain"]["tokens_per_s"], "plain"))  # fmt: skip
    rows.append(
        harness.row(
            "training", "defaults", "hf_defaults", "throughput", "tok/s", s["hf_defaults"]["tokens_per_s"]
        )
    )
    rows.append(harness.row("training", "defaults", "kbtune", "throughput", "tok/s", s["kbtune"]["tokens_per_s"],
                            s["hf_defaults"]["tokens_per_s"], "hf_defaults"))  # fmt: skip
    rows.append(
        harness.row(
            "training", "precision", "kbtune_fp32", "throughput", "tok/s", s["kbtune_fp32"]["tokens_per_s"]
        )
    )
    rows.append(harness.row("training", "precision", "kbtune", "throughput", "tok/s", s["kbtune"]["tokens_per_s"],
                            s["kbtune_fp32"]["tokens_per_s"], "kbtune_fp32"))  # fmt: skip
    for name in samples:
        rows.append(
            harness.row("training", f"MFU ({precision[name]})", name, "MFU", "%", s[name]["mfu_percent"])
        )
    tokens = loss_steps * ctx.batch * ctx.block
    loss_label = f"val/loss, identical settings, {loss_steps} steps ({tokens:,} tokens)"
    rows.append(harness.row("training", loss_label, "plain", "val/loss", "", c["plain"]["val_loss"]))
    for name in ("kbtune", "hf_trainer"):
        rows.append(
            harness.row(
                "training",
                loss_label,
                name,
                "val/loss",
                "",
                c[name]["val_loss"],
                c["plain"]["val_loss"],
                "plain",
            )
        )
    rows.append(harness.row("training", f"val/loss, {loss_steps} steps, kbtune in fp32 vs bf16", "kbtune_fp32", "val/loss", "",
                            c["kbtune_fp32"]["val_loss"]))  # fmt: skip
    rows.append(harness.row("training", f"val/loss, {loss_steps} steps, kbtune in fp32 vs bf16", "kbtune", "val/loss", "",
                            c["kbtune"]["val_loss"], c["kbtune_fp32"]["val_loss"], "kbtune_fp32"))  # fmt: skip
    for dtype, value in peak.items():
        rows.append(
            harness.row("training", "peak matmul", dtype, "peak", "GFLOP/s", harness.summary([value]))
        )

    r = {key: harness.ratio(s, "kbtune", base, "tokens_per_s")
         for key, base in (("plain", "plain"), ("hf", "hf_trainer"), ("defaults", "hf_defaults"), ("bf16", "kbtune_fp32"))}  # fmt: skip
    loss_plain = harness.ratio(c, "kbtune", "plain", "val_loss")
    loss_hf = harness.ratio(c, "kbtune", "hf_trainer", "val_loss")
    loss_fp32 = harness.ratio(c, "kbtune", "kbtune_fp32", "val_loss")
    within = max(abs(loss_plain - 1), abs(loss_hf - 1))
    mfu = s["kbtune"]["mfu_percent"]["median"]
    bf16_peak_ratio = peak["bf16"] / peak["fp32"]
    targets = [
        harness.target("training tok/s, kbtune / plain loop (identical settings)", r["plain"], ">=", 0.95, "plain loop"),
        harness.target("training tok/s, kbtune / HF Trainer (identical settings)", r["hf"], ">=", 1.0, "HF Trainer"),
        harness.target("training tok/s, kbtune defaults / HF Trainer defaults", r["defaults"], ">=", 1.3, "HF Trainer defaults"),
        harness.target(f"val/loss after {loss_steps} identical steps, largest |kbtune / peer - 1| (plain loop, HF Trainer)",
                       within, "<=", 0.01, "plain loop, HF Trainer"),
        harness.target(f"val/loss after {loss_steps} steps, |kbtune {ctx.precision} / kbtune fp32 - 1|", abs(loss_fp32 - 1),
                       "<=", 0.01, "kbtune fp32"),
        harness.target(f"MFU of the default run ({ctx.precision}), % of measured peak", mfu, ">=", 30.0),
    ]  # fmt: skip
    if ctx.precision.startswith("bf16") and bf16_peak_ratio >= 4:
        targets.append(harness.target(f"tok/s, kbtune {ctx.precision} / fp32 (bf16 peak {bf16_peak_ratio:.1f}x fp32)",
                                      r["bf16"], ">=", 2.5, "kbtune fp32"))  # fmt: skip
    setting = f"{ctx.spec.name}, batch {ctx.batch}, block {ctx.block}, {ctx.precision}"
    readme = [
        {"comparison": f"training throughput, identical settings ({setting})",
         "result": f"kbtune {fmt_tps(s['kbtune']['tokens_per_s'])}; plain PyTorch loop {fmt_tps(s['plain']['tokens_per_s'])}; "
                   f"`transformers.Trainer` {fmt_tps(s['hf_trainer']['tokens_per_s'])}: **{r['plain']:.2f}x plain, {r['hf']:.2f}x HF Trainer**",
         "target": ">= 0.95x plain, >= 1.0x HF", "targets": targets[0:2]},
        {"comparison": "kbtune defaults vs HF Trainer defaults (fp32, its own optimizer settings), same model",
         "result": f"{s['kbtune']['tokens_per_s']['median']:,.0f} vs {s['hf_defaults']['tokens_per_s']['median']:,.0f} tok/s: **{r['defaults']:.2f}x**",
         "target": ">= 1.3x", "targets": targets[2:3]},
        {"comparison": f"val/loss after {loss_steps} steps at identical settings ({ctx.plan.optim.warmup_steps} warmup + "
                       f"{loss_steps - ctx.plan.optim.warmup_steps}; {tokens:,} tokens, one run each)",
         "result": f"kbtune {c['kbtune']['val_loss']['median']:.4f}, plain loop {c['plain']['val_loss']['median']:.4f}, "
                   f"HF Trainer {c['hf_trainer']['val_loss']['median']:.4f}: **{loss_plain:.4f}x plain, {loss_hf:.4f}x HF**",
         "target": "within 1%", "targets": targets[3:4]},
        {"comparison": f"{ctx.precision} vs fp32, kbtune, val/loss after the same {loss_steps} steps",
         "result": f"{c['kbtune']['val_loss']['median']:.4f} vs {c['kbtune_fp32']['val_loss']['median']:.4f}: **{loss_fp32:.4f}x**",
         "target": "within 1%", "targets": targets[4:5]},
        {"comparison": f"model-FLOP utilisation of the default run ({FLOPS_SHORT})",
         "result": f"**{mfu:.1f}%** of the measured {'bf16' if ctx.precision.startswith('bf16') else 'fp32'} matmul peak "
                   f"({peak['bf16']:,.0f} GFLOP/s bf16, {peak['fp32']:,.0f} fp32: {bf16_peak_ratio:.1f}x)",
         "target": ">= 30%", "targets": targets[5:6]},
    ]  # fmt: skip
    if len(targets) > 6:
        readme.append({"comparison": f"kbtune {ctx.precision} vs fp32 throughput (bf16 peak >= 4x fp32)",
                       "result": f"{s['kbtune']['tokens_per_s']['median']:,.0f} vs {s['kbtune_fp32']['tokens_per_s']['median']:,.0f} tok/s: **{r['bf16']:.2f}x**",
                       "target": ">= 2.5x", "targets": targets[6:7]})  # fmt: skip
    # Each line shows met / not met of the targets it states (harness.readme_row records their names).
    readme = [harness.readme_row(line["comparison"], line["result"], line["target"], line["targets"]) for line in readme]
    details = {
        "model": ctx.spec.name, "architecture": ctx.spec.architecture, "flops_per_token": fpt, "flops_formula": FLOPS_FORMULA,
        "batch": ctx.batch, "block": ctx.block, "steps": ctx.steps, "warmup_steps_skipped": ctx.warmup,
        "loss_comparison_steps": loss_steps, "precision": precision, "peak_gflops": peak, "peak_shapes": PEAK_SHAPES,
        "hf_optimizer": "adamw_torch_fused (pinned)", "torch_threads": torch.get_num_threads(),
        "train_blocks": int(len(ctx.prepared.train)), "val_blocks": int(len(ctx.val)),
        "progress_callback": progress_callback_state(), "loss_samples": converged,
    }  # fmt: skip
    return {
        "rows": rows,
        "targets": targets,
        "summaries": s,
        "samples": samples,
        "details": details,
        "readme": readme,
    }


def progress_callback_state() -> str:
    if importlib.util.find_spec("kbtune.progress"):
        return "on: kbtune.progress.ProgressCallback + ResumeState, as a worker runs them"
    return "no kbtune.progress module"


def main() -> None:
    harness.section_main(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
