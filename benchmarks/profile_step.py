"""Where a training step's time goes, and what bf16 options buy, on the machine at hand.

1. Breakdown: torch.profiler over training steps of the default model (model=small, batch 8, block
   256) in the default precision, op self-times grouped into matmuls, attention, casts, the loss
   head (log-softmax, softmax gradient), other element-wise ops and the optimizer (clip + AdamW), plus
   a batch from kbtune's own train dataloader. Three steps, after two warmup steps; the profiler's
   own overhead (~5%) is in the total, so the step time beside it is measured without the profiler.
   Shown for kbtune's step as it was before the chunked LM-head loss (the full [batch, block, vocab]
   logits, soft-maxed over a transposed view, an argmax every step) and as it is now, in bf16-mixed,
   and for fp32.
2. Options, each a plain step loop over the same model, batch and loss (kbtune's chunked head), same
   initial weights: bf16-mixed (kbtune's default on CPUs with bf16), bf16 weights with fp32 master
   weights and optimizer state (Lightning's bf16-true plus a master copy), torch.compile of the decoder
   (its compile time counted separately, with the steps it takes to pay back), and fp32. Each uses the
   attention kernel kbtune's training uses (trainer.attention); where trainer.attention=auto would
   pick another one, bf16-mixed with that kernel is measured too. Tokens/s,
   MFU against the measured peak of the precision, interleaved in rotating order.
3. Host memory: kbtune's real training path (training.run_kbtune) in fresh processes, with
   trainer.reuse_freed_memory on (the default) and off, interleaved: tokens/s and the page faults of
   the whole run. In a fresh process, as a user's `scripts/train.py` runs: a long-lived benchmark
   process that has run bigger models before keeps a heap with room to spare, which hides the cost.
   Parts 1 and 2 run with the setting on, as kbtune's training does.

Standalone: `python benchmarks/profile_step.py [--quick]`."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import harness
import training

CATEGORIES = ("matmul", "attention", "casts", "loss head", "element-wise", "optimizer", "other")
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int8pack_mm"}
CASTS = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"}
LOSS = {"aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::exp_", "aten::exp", "aten::scatter_add_",
        "aten::gather", "aten::argmax", "aten::nll_loss_forward", "aten::nll_loss_backward", "aten::logsumexp",
        "aten::index_put_", "_ChunkedHeadLoss", "_ChunkedHeadLossBackward"}  # fmt: skip
OPTIMIZER = {"aten::_fused_adamw_", "aten::linalg_vector_norm", "aten::_foreach_norm", "aten::_foreach_mul_",
             "aten::stack", "aten::clamp", "aten::reciprocal"}  # fmt: skip
ELEMENTWISE = ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::pow", "aten::rsqrt", "aten::mean",
               "aten::neg", "aten::cat", "aten::fill_", "aten::zero_", "aten::sum", "aten::embedding", "aten::slice",
               "aten::where", "aten::ne", "aten::eq", "aten::threshold", "aten::sigmoid", "aten::index", "aten::masked",
               "aten::cos", "aten::sin", "aten::ones", "aten::zeros", "aten::empty", "aten::arange", "aten::expand",
               "aten::embedding_dense_backward", "aten::new_", "aten::copy", "aten::bitwise", "aten::all")  # fmt: skip


def category(name: str) -> str:
    if name in MATMUL:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in CASTS:
        return "casts"
    if name in LOSS:
        return "loss head"
    if name in OPTIMIZER or name.startswith("Optimizer.") or "_foreach_" in name:
        return "optimizer"
    if name.startswith(ELEMENTWISE):
        return "element-wise"
    return "other"


def kbtune_attention(ctx: training.Context, precision: str, attention: str | None = None) -> str:
    """The kernel kbtune's training picks for this precision, with trainer.attention as configured
    (or as `attention`)."""
    from dataclasses import replace

    from kbtune.training_loop import resolve_attention

    trainer = replace(ctx.plan.trainer, precision=precision, attention=attention or ctx.plan.trainer.attention)
    return resolve_attention(trainer, ctx.block)


class Step:
    """One model and optimizer, stepped with a chosen loss and precision."""

    def __init__(self, ctx: training.Context, loss: str, precision: str, compile_decoder: bool = False,
                 attention: str | None = None):  # fmt: skip
        import torch

        from kbtune.modeling.module import chunked_head

        torch.manual_seed(0)
        self.model = ctx.new_model()
        self.model.train()
        # The attention kernel kbtune's training picks for this precision (trainer.attention=auto);
        # kbtune's loss before the chunked head ran with the fused kernel, sdpa.
        if attention is None:
            attention = "sdpa" if loss == "full logits (before)" else kbtune_attention(ctx, precision)
        self.model.set_attn_implementation(attention)
        self.loss, self.precision = loss, precision
        self.params = list(self.model.parameters())
        if precision == "bf16-true":
            # fp32 master weights hold the updates a bf16 weight would round away; the model computes in bf16.
            self.master = [p.detach().clone().float().requires_grad_(True) for p in self.params]
            self.model.to(torch.bfloat16)
            opt_params = self.master
        else:
            opt_params = self.params
        decay = [p for p in opt_params if p.dim() >= 2]
        no_decay = [p for p in opt_params if p.dim() < 2]
        o = ctx.plan.optim
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)  # fmt: skip
        self.decoder, self.head = chunked_head(self.model)
        if compile_decoder:
            import torch._inductor.config

            # A cold compile, as a user's first run pays: no kernels reused from an earlier run's cache.
            torch._inductor.config.force_disable_caches = True
        self.body = torch.compile(self.decoder) if compile_decoder else self.decoder
        self.clip = ctx.plan.trainer.gradient_clip_val

    def loss_of(self, ids: Any) -> Any:
        import torch

        from kbtune.modeling.loss import head_token_stats

        if self.loss == "full logits (before)":
            # kbtune's loss before the chunked head: full logits, log-softmax over a transposed
            # [batch, vocab, block] view, and the argmax counted every training step.
            logits = self.model(input_ids=ids).logits
            target = ids[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), target, reduction="none"
            )
            (logits[:, :-1].argmax(-1) == target).sum()
            return nll.mean()
        return head_token_stats(self.body(input_ids=ids).last_hidden_state, self.head.weight, ids).loss

    def __call__(self, ids: Any) -> float:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed"):
            loss = self.loss_of(ids)
        loss.backward()
        if self.precision == "bf16-true":
            for master, p in zip(self.master, self.params, strict=True):
                master.grad = p.grad.float()
                p.grad = None
            torch.nn.utils.clip_grad_norm_(self.master, self.clip)
            self.opt.step()
            with torch.no_grad():
                for master, p in zip(self.master, self.params, strict=True):
                    p.copy_(master)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def batches(ctx: training.Context, n: int) -> list[Any]:
    import torch

    data = torch.from_numpy(ctx.prepared.train.astype("int64"))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return [data[order[i * ctx.batch : (i + 1) * ctx.batch]] for i in range(n)]


def data_ms(ctx: training.Context, n: int) -> float:
    """Milliseconds per batch from kbtune's own train dataloader (sampler, collate), as Lightning reads it."""
    from kbtune.data.datamodule import KBDataModule

    datamodule = KBDataModule(ctx.preparation, ctx.batch, seed=0)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    n = min(n, len(loader) - 1)
    loader = iter(loader)
    next(loader)
    t0 = time.perf_counter()
    for _ in range(n):
        next(loader)
    return 1000 * (time.perf_counter() - t0) / n


def breakdown(ctx: training.Context, loss: str, precision: str, data: list[Any]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    step = Step(ctx, loss, precision)
    for ids in data[:2]:
        step(ids)
    t0 = time.perf_counter()
    for ids in data[2:5]:
        step(ids)
    step_ms = 1000 * (time.perf_counter() - t0) / 3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for ids in data[5:8]:
            step(ids)
    by: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by[category(event.key)] += event.self_cpu_time_total / 1000 / 3  # ms per step
    return {
        "step_ms": step_ms,
        "profiled_ms": sum(by.values()),
        **{f"{c}_ms": by.get(c, 0.0) for c in CATEGORIES},
    }


# A child process: kbtune's training path once, with the setting as asked; prints its tokens/s and faults.
FRESH_RUN = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import training
ctx = training.Context(Path(sys.argv[2]), sys.argv[3] == "quick", int(sys.argv[4]), int(sys.argv[5]),
                       ("trainer.reuse_freed_memory=" + sys.argv[6],))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
sample = training.run_kbtune(ctx)
sample["page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print("RESULT " + json.dumps(sample))
"""


def fresh_run(workdir: Path, quick: bool, warmup: int, measured: int, reuse: bool) -> dict[str, float]:
    cmd = [harness.PYTHON, "-c", FRESH_RUN, str(Path(__file__).parent), str(workdir), "quick" if quick else "full",
           str(warmup), str(measured), str(reuse).lower()]  # fmt: skip
    _, proc = harness.run_timed(cmd, env=harness.bench_env(), timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the fresh training run failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def run(workdir: Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    from kbtune.host_memory import reuse_freed_memory

    rounds = rounds or (1 if quick else 2)
    # 3. first: fresh processes, before this one's own heap matters to anything.
    fresh_rounds, fresh_steps = (1, (2, 4)) if quick else (3, (5, 25))
    fresh = harness.interleave_pairs(
        {"kbtune": {"reuse on": lambda: fresh_run(workdir, quick, *fresh_steps, True),
                    "reuse off": lambda: fresh_run(workdir, quick, *fresh_steps, False)}}, fresh_rounds, "host memory")  # fmt: skip
    reuse_freed_memory()  # as kbtune's training sets it: every step below runs with it
    warmup, measured = (2, 4) if quick else (3, 12)
    ctx = training.Context(workdir, quick, 1, 1)
    data = batches(ctx, warmup + measured + 8)
    peak_s = 0.05 if quick else 0.3
    peak = {"bf16-mixed": training.matmul_peak_gflops("bfloat16", peak_s),
            "fp32": training.matmul_peak_gflops("float32", peak_s)}  # fmt: skip
    peak["bf16-true"] = peak["bf16-mixed"]
    fpt = ctx.flops_per_token()
    tokens = ctx.batch * ctx.block
    default = ctx.precision
    # The model's matmul FLOPs per step: 6N per token (the attention term is not a matmul of weights).
    matmul_flops = (fpt - 6 * ctx.spec.n_layer * ctx.spec.n_embd * ctx.block) * tokens

    # 1. the breakdown
    cases = {"kbtune before (full logits)": ("full logits (before)", default), "kbtune now": ("chunked", default),
             "kbtune now, fp32": ("chunked", "fp32")}  # fmt: skip
    prof = {name: breakdown(ctx, *case, data) for name, case in cases.items()}
    loader_ms = data_ms(ctx, 20 if quick else 50)
    header = ["step", "step ms", *[f"{c} ms" for c in CATEGORIES], "data ms"]
    table = []
    for name, b in prof.items():
        share = {c: 100 * b[f"{c}_ms"] / b["profiled_ms"] for c in CATEGORIES}
        table.append([f"{name} ({cases[name][1]})", f"{b['step_ms']:.0f}",
                      *[f"{b[f'{c}_ms']:.1f} ({share[c]:.0f}%)" for c in CATEGORIES], f"{loader_ms:.2f}"])  # fmt: skip
    ideal_ms = 1000 * matmul_flops / (peak[default] * 1e9) if default in peak else None

    # 2. the options
    options = {
        "bf16-mixed": lambda: Step(ctx, "chunked", "bf16-mixed"),
        "bf16-true + fp32 master weights": lambda: Step(ctx, "chunked", "bf16-true"),
        "bf16-mixed + torch.compile": lambda: Step(ctx, "chunked", "bf16-mixed", compile_decoder=True),
        "fp32": lambda: Step(ctx, "chunked", "fp32"),
    }
    auto = kbtune_attention(ctx, "bf16-mixed", "auto")
    if auto != kbtune_attention(ctx, "bf16-mixed"):
        # What trainer.attention=auto would change (eager attention for bf16 on a CPU at short blocks).
        options[f"bf16-mixed + {auto} attention (trainer.attention=auto)"] = lambda: Step(
            ctx, "chunked", "bf16-mixed", attention=auto
        )
    if quick:
        options.pop("bf16-mixed + torch.compile")  # minutes of compiling is no smoke test

    def measure(make: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        step = make()
        step(data[0])  # the first step compiles, where compiling is asked for
        first = time.perf_counter() - t0
        for ids in data[1:warmup]:
            step(ids)
        t1 = time.perf_counter()
        for ids in data[warmup : warmup + measured]:
            loss = step(ids)
        seconds = (time.perf_counter() - t1) / measured
        return {
            "step_ms": 1000 * seconds,
            "tokens_per_s": tokens / seconds,
            "first_step_s": first,
            "loss": loss,
        }

    variants = {name: (lambda make=make: measure(make)) for name, make in options.items()}
    samples = harness.interleave(variants, rounds, "profile")
    for name, runs in samples.items():
        p = peak["fp32" if name == "fp32" else "bf16-mixed"]
        for sample in runs:
            sample["mfu_percent"] = 100 * sample["tokens_per_s"] * fpt / (p * 1e9)
    s = harness.summarise(samples)
    base = s["bf16-mixed"]
    rows = []
    for name in samples:
        rows.append(harness.row("profile", "bf16 options, model=small", name, "throughput", "tok/s", s[name]["tokens_per_s"],
                                base["tokens_per_s"], "bf16-mixed"))  # fmt: skip
        rows.append(
            harness.row("profile", "bf16 options, model=small", name, "MFU", "%", s[name]["mfu_percent"])
        )
    for name, b in prof.items():
        rows.append(
            harness.row("profile", "step breakdown", name, "step", "ms", harness.summary([b["step_ms"]]))
        )
    f = harness.summarise(fresh)
    on, off = f["kbtune reuse on"], f["kbtune reuse off"]
    reuse_ratio = harness.paired_ratio(fresh, "kbtune reuse on", "kbtune reuse off", "tokens_per_s")
    label = "fresh process, kbtune's training path, trainer.reuse_freed_memory"
    rows.append(harness.row("profile", label, "reuse off", "throughput", "tok/s", off["tokens_per_s"]))
    rows.append(harness.row("profile", label, "reuse on", "throughput", "tok/s", on["tokens_per_s"], off["tokens_per_s"],
                            "reuse off"))  # fmt: skip
    rows.append(harness.row("profile", label, "reuse off", "page faults", "", off["page_faults"]))
    rows.append(harness.row("profile", label, "reuse on", "page faults", "", on["page_faults"]))
    options_rows = []
    for name in samples:
        step_ms = s[name]["step_ms"]["median"]
        extra = ""
        if "compile" in name:
            saved = base["step_ms"]["median"] - step_ms
            compile_s = s[name]["first_step_s"]["median"] - base["first_step_s"]["median"]
            extra = (f"compiling took {compile_s:.1f} s more than a first eager step; pays back after "
                     f"{compile_s * 1000 / saved:,.0f} steps" if saved > 0 else f"compiling took {compile_s:.1f} s and saves nothing")  # fmt: skip
        options_rows.append([name, f"{step_ms:.0f}", f"{s[name]['tokens_per_s']['median']:,.0f}",
                             f"{s[name]['tokens_per_s']['median'] / base['tokens_per_s']['median']:.2f}x",
                             f"{s[name]['mfu_percent']['median']:.1f}%", extra])  # fmt: skip
    before, now = prof["kbtune before (full logits)"]["step_ms"], prof["kbtune now"]["step_ms"]
    readme_tables = [
        {"title": f"Where a training step of model={ctx.spec.name} goes ({default}, batch {ctx.batch}, block {ctx.block}; "
                  "`--only profile`)",
         "header": header, "rows": table,
         "note": f"Profiler self-times per step; the step column is timed without the profiler. At the measured "
                 f"{'bf16' if default.startswith('bf16') else 'fp32'} peak the model's matmuls (6N FLOPs per token) would need "
                 f"{ideal_ms:.0f} ms. Before -> now: {before:.0f} -> {now:.0f} ms ({before / now:.2f}x)."},
        {"title": f"bf16 options on model={ctx.spec.name} (plain step loop, same loss, weights and batches)",
         "header": ["option", "step ms", "tok/s", "vs bf16-mixed", "MFU", "note"], "rows": options_rows,
         "note": f"MFU against the measured peak of the precision: bf16 {peak['bf16-mixed']:,.0f}, fp32 {peak['fp32']:,.0f} GFLOP/s."},
        {"title": f"Reusing freed memory (`trainer.reuse_freed_memory`, model={ctx.spec.name}, {default}, kbtune's training in fresh processes)",
         "header": ["reuse_freed_memory", "tok/s", "page faults per run", "tok/s vs off"],
         "rows": [[name, f"{v['tokens_per_s']['median']:,.0f} ({v['tokens_per_s']['min']:,.0f}..{v['tokens_per_s']['max']:,.0f})",
                   f"{v['page_faults']['median']:,.0f}", f"{reuse_ratio['median']:.2f}x ({reuse_ratio['min']:.2f}..{reuse_ratio['max']:.2f})" if name == "on" else "1.00x"]
                  for name, v in (("off", off), ("on", on))],
         "note": f"Medians of {fresh_rounds} rounds, each a fresh process per setting, run back to back; the ratio is the median of "
                 f"the per-round ratios. Page faults: minor faults of the whole training run ({sum(fresh_steps)} steps, with the "
                 "model's construction and the end-of-training validation)."},
    ]  # fmt: skip
    details = {"breakdown": prof, "data_loader_ms_per_batch": loader_ms, "peak_gflops": peak, "flops_per_token": fpt,
               "ideal_matmul_ms": ideal_ms, "categories": {"matmul": sorted(MATMUL), "casts": sorted(CASTS),
               "loss head": sorted(LOSS), "optimizer": sorted(OPTIMIZER)}, "warmup_steps": warmup, "measured_steps": measured}  # fmt: skip
    return {
        "rows": rows,
        "targets": [],
        "summaries": {**s, **f},
        "samples": {**samples, **fresh},
        "details": details,
        "readme_tables": readme_tables,
    }


def main() -> None:
    harness.section_main(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
