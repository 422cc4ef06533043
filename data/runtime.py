"""Run plumbing shared by every entry point (data/ is the most upstream package, so all may import it):
the resolved config saved with each run, one-line errors for unusable input, precision choice,
and the Lightning Trainer built from the `trainer` config group.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf


# `${or_default:${run_dir},runs/...}` in the configs' hydra.run.dir: Hydra's log and .hydra/ land in the run's own
# folder when run_dir is given (not in a dated folder of the cwd). Registered on import: every entry point imports
# this module before @hydra.main composes its config.
OmegaConf.register_new_resolver("or_default", lambda value, default: default if value in (None, "") else value,
                                replace=True)


class UserError(ValueError):
    """An input the user must fix (missing shards, mismatched checkpoint, bad config): one line, exit 2."""


def run_dir_of(cfg: DictConfig) -> Path:
    """The run's output folder: cfg.run_dir if set, else Hydra's output dir, else the cwd."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 - not under @hydra.main (tests, notebooks)
        return Path.cwd()


def env_is_rank_zero() -> bool:
    """Rank zero of the job, judged from the launcher's environment (before any process group exists):
    torchrun/Lightning (RANK, NODE_RANK, LOCAL_RANK) or SLURM (SLURM_PROCID)."""
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    if "SLURM_PROCID" in os.environ:
        return os.environ["SLURM_PROCID"] == "0"
    return os.environ.get("NODE_RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> dict:
    """Write config.yaml (every interpolation resolved) next to the run's outputs; return it as a dict."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if env_is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return resolved


def cli(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn the errors a user can fix into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            return fn(cfg)
        except (UserError, FileNotFoundError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def config_from_dict(cls, d: dict, what: str):
    """A config dataclass from a plain dict, refusing keys it does not know (a typo must not pass silently)."""
    import dataclasses

    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} config keys: {sorted(unknown)}")
    return cls(**d)


def _write_whole(path: Path, text: str) -> None:
    """`text` to `path`, written whole or not at all (a temporary file, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    _write_whole(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line."""
    _write_whole(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- optimisation

def warmup_cosine(step: int, warmup: int, progress: float, min_ratio: float, schedule: str = "cosine",
                  decay_frac: float = 0.2) -> float:
    """Linear warm-up over `warmup` steps, then, as progress goes 0 -> 1, either cosine from 1 to `min_ratio`
    or warmup-stable-decay ("wsd": 1 until the last `decay_frac` of training, then linear to `min_ratio`)."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, max(0.0, progress))
    if schedule == "wsd":
        return 1.0 if t < 1 - decay_frac else 1 - (1 - min_ratio) * (t - (1 - decay_frac)) / max(decay_frac, 1e-9)
    if schedule != "cosine":
        raise ValueError(f"schedule must be cosine or wsd, got {schedule!r}")
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class ScheduleClock:
    """Training progress in [0, 1]: by steps; or by wall time when a time budget is set (CPU runs of
    'the best model in N minutes'); or by measured FLOPs when a FLOPs budget is set (the ablation's
    compute-matched arms). Whichever is furthest along."""

    def __init__(self, total_steps: int, warmup: int, budget_s: float | None = None,
                 flops_budget: float | None = None):
        self.total, self.warmup, self.budget_s, self.flops_budget = total_steps, warmup, budget_s, flops_budget
        self.t0: float | None = None
        self.flops = 0.0  # added to by the training step

    def start(self, already_s: float = 0.0):
        """Start (or, after a resume, continue) the wall-clock: `already_s` seconds were spent before."""
        self.t0 = time.time() - already_s

    def elapsed(self) -> float:
        return time.time() - self.t0 if self.t0 is not None else 0.0

    def progress(self, step: int) -> float:
        p = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.budget_s and self.t0 is not None:
            p = max(p, (time.time() - self.t0) / self.budget_s)
        if self.flops_budget:
            p = max(p, self.flops / self.flops_budget)
        return p

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0 and step >= self.warmup


class ScheduledTraining:
    """Mixin for LightningModules built on adamw_with_schedule: the schedule's clock (wall time, FLOPs)
    is saved in checkpoints and continued on resume, so a resumed run keeps its place in the schedule.

    It also holds the NaN/inf policy: a step whose loss (on any rank) or gradients are not finite is
    skipped (no optimizer update) and counted in `train/skipped_steps`; after `max_skipped_steps` such
    steps the run stops with a one-line error, so a diverged run never goes on with broken weights.
    """

    _clock_resume: dict | None = None
    max_skipped_steps: int = 20
    skipped_steps: int = 0

    def on_train_start(self):
        self.clock.start((self._clock_resume or {}).get("elapsed_s", 0.0))
        self.clock.flops = (self._clock_resume or {}).get("flops", 0.0)
        self.skipped_steps = (self._clock_resume or {}).get("skipped_steps", 0)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["schedule_clock"] = {"elapsed_s": self.clock.elapsed(), "flops": self.clock.flops,
                                        "skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint):
        self._clock_resume = checkpoint.get("schedule_clock")

    def finite_or_skip(self, loss):
        """Return `loss`, or None (Lightning then skips backward and the update) when it is not finite on
        some rank; every rank takes the same decision, so DDP never waits on a rank that skipped."""
        import torch

        bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach())) else 1.0, device=loss.device)
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if float(bad) == 0:
            return loss
        self._skip(f"non-finite loss {float(loss.detach()):.4g}")
        return None

    def on_before_optimizer_step(self, optimizer):
        import torch

        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # one device sync per step, not one per tensor; gradients are already all-reduced across ranks
        if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None  # AdamW leaves parameters without gradients untouched
            self._skip("non-finite gradients")

    def _skip(self, why: str):
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        if self.skipped_steps > self.max_skipped_steps:
            raise UserError(f"{why} at step {self.global_step}: {self.skipped_steps} steps skipped, more than "
                            f"max_skipped_steps={self.max_skipped_steps}; the run diverged (try a lower train.lr)")
        print(f"warning: {why} at step {self.global_step}; step skipped ({self.skipped_steps} so far)", flush=True)


def _batched_muon():
    import torch
    from torch.optim._muon import _adjust_lr  # torch's own LR scaling per matrix shape (torch is pinned)

    class BatchedMuon(torch.optim.Muon):
        """torch.optim.Muon's update, computed for all same-shape matrices of a group at once: the momentum
        buffers are updated with foreach ops and the Newton-Schulz iterations run as batched matmuls (bf16),
        instead of ~5 small matmuls per matrix in a Python loop. Same state ("momentum_buffer") and
        hyper-parameters, so checkpoints of either load in the other (tests/data/test_runtime.py compares
        the two step for step). On the tiny decoder (42 matrices) the optimizer step took 42 ms against 69 ms here."""

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                params, grads, bufs = [], [], []
                self._init_group(group, params, grads, bufs)
                by_shape: dict[tuple, list[int]] = {}
                for i, p in enumerate(params):
                    by_shape.setdefault(tuple(p.shape), []).append(i)
                lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
                for shape, idx in by_shape.items():
                    ps, gs, bs = [params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx]
                    torch._foreach_lerp_(bs, gs, 1 - mom)
                    update = torch.stack(gs).lerp(torch.stack(bs), mom) if group["nesterov"] else torch.stack(bs)
                    update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                    torch._foreach_mul_(ps, 1 - lr * wd)
                    torch._foreach_add_(ps, list(update.to(ps[0].dtype).unbind(0)),
                                        alpha=-_adjust_lr(lr, group["adjust_lr_fn"], ps[0].shape))
            return loss

    return BatchedMuon


def newton_schulz(g, coefficients: tuple[float, float, float], steps: int, eps: float):
    """Muon's quintic Newton-Schulz orthogonalisation (Keller Jordan's, as in torch.optim.Muon) of a batch of
    matrices g (..., rows, cols), in bf16."""
    import torch

    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _muon_adamw():
    import torch

    class MuonAdamW(torch.optim.Optimizer):
        """Muon (torch.optim.Muon's update, batched: BatchedMuon) on the transformer blocks' 2-D matrices and AdamW
        on everything else (embeddings, head, norms), as one optimizer so one LR schedule drives both. The
        groups are the inner optimizers' own dicts, so the scheduler's LR reaches them. Muon's update is scaled
        to AdamW's RMS ("match_rms_adamw", Moonlight), so both take the same base LR."""

        def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], lr: float, betas, momentum: float):
            self.muon = _batched_muon()(muon_groups, lr=lr, momentum=momentum, adjust_lr_fn="match_rms_adamw")
            self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas)
            super().__init__(self.muon.param_groups + self.adamw.param_groups, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.muon.step()
            self.adamw.step()
            return loss

        def state_dict(self):
            return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

        def load_state_dict(self, state_dict):
            self.muon.load_state_dict(state_dict["muon"])
            self.adamw.load_state_dict(state_dict["adamw"])

    return MuonAdamW


def is_muon_matrix(name: str, p) -> bool:
    """The hidden matrices Muon is for: 2-D weights inside the transformer blocks (not embeddings or the head)."""
    return p.ndim == 2 and ".layers." in name


def adamw_with_schedule(named_params, o: dict, max_steps: int, lr_scale: dict[str, float] | None = None,
                        stages: list[dict] | None = None):
    """AdamW (weight decay only on tensors with >= 2 dims, as nanoGPT) with linear warm-up + cosine decay
    (or warmup-stable-decay: o["schedule"] = "wsd"). With o["optimizer"] = "muon", the transformer blocks'
    2-D matrices are trained by Muon instead (see MuonAdamW).

    `lr_scale` maps a parameter-name prefix to a multiplier of the base LR; 0 freezes those parameters
    for the whole run. `stages` ([{"until": 0.2, "lr_scale": {"decoder": 0}}, ...]) multiply further
    while training progress is below `until`, e.g. LLaVA's connector-only first stage.
    Returns (clock, Lightning's optimizer config); call clock.start() when training starts.
    """
    import torch

    prefixes = sorted({*(lr_scale or {}), *(k for st in stages or [] for k in st["lr_scale"])}, key=len, reverse=True)
    muon = o.get("optimizer", "adamw") == "muon"
    if o.get("optimizer", "adamw") not in ("adamw", "muon"):
        raise ValueError(f"optimizer must be adamw or muon, got {o.get('optimizer')!r}")
    named_params = list(named_params)
    groups: dict[tuple[str, bool, bool], list] = {}
    for name, p in named_params:
        prefix = next((k for k in prefixes if name.startswith(k)), "")
        if (lr_scale or {}).get(prefix, 1.0) == 0:
            p.requires_grad_(False)
        if p.requires_grad:
            groups.setdefault((prefix, p.ndim >= 2, muon and is_muon_matrix(name, p)), []).append(p)
    names = [n for n, _ in named_params]
    unmatched = [k for k in prefixes if not any(n.startswith(k) for n in names)]
    if unmatched:
        raise ValueError(f"lr_scale names no parameter: {unmatched} (parameter names start e.g. {names[:2]})")
    keys = [k for k in groups if not k[2]] if not muon else [k for k in groups if k[2]] + [k for k in groups if not k[2]]
    as_group = lambda k: {"params": groups[k], "weight_decay": o["weight_decay"] if k[1] else 0.0}
    if muon:
        opt = _muon_adamw()([as_group(k) for k in keys if k[2]], [as_group(k) for k in keys if not k[2]],
                            lr=o["lr"], betas=tuple(o["betas"]), momentum=o.get("muon_momentum", 0.95))
    else:
        opt = torch.optim.AdamW([as_group(k) for k in keys], lr=o["lr"], betas=tuple(o["betas"]))
    total = max_steps if max_steps and max_steps > 0 else o.get("total_steps", 10_000)
    clock = ScheduleClock(total, o["warmup_steps"], o.get("time_budget_s"), o.get("flops_budget"))

    def factor(prefix: str):
        def f(step: int) -> float:
            progress = clock.progress(step)
            stage = next((st for st in stages or [] if progress < st["until"]), None)
            extra = stage["lr_scale"].get(prefix, 1.0) if stage else 1.0
            return warmup_cosine(step, o["warmup_steps"], progress, o["min_lr_ratio"], o.get("schedule", "cosine"),
                                 o.get("decay_frac", 0.2)) * (lr_scale or {}).get(prefix, 1.0) * extra
        return f

    sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor(k[0]) for k in keys])
    return clock, {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ---------------------------------------------------------------- precision

@functools.lru_cache(maxsize=1)
def cpu_matmul_peaks(n: int = 1024, seconds: float = 0.3, rounds: int = 3) -> dict[str, float]:
    """Measured GFLOP/s of an n^3 matmul in fp32 and in bf16 on this CPU: the best of `rounds`
    interleaved rounds (other work on a shared machine only ever slows a round down, so the best
    round is the stable figure; one noisy round once made `precision: auto` pick the slower dtype)."""
    import torch

    mats = {name: (torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    best = {name: 0.0 for name in mats}
    for _ in range(rounds):
        for name, (a, b) in mats.items():
            a @ b
            times, t_end = [], time.perf_counter() + seconds / rounds
            while time.perf_counter() < t_end or len(times) < 3:
                t = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t)
            times.sort()
            best[name] = max(best[name], 2 * n**3 / times[len(times) // 2] / 1e9)
    return best


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' -> bf16-mixed on CUDA; on CPU whichever of fp32 / bf16 autocast measures faster here."""
    if precision != "auto":
        return precision
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    peaks = cpu_matmul_peaks()
    return "bf16-mixed" if peaks["bf16"] > 1.1 * peaks["fp32"] else "32-true"


def inference_dtype(precision: str = "auto", accelerator: str = "cpu"):
    """The dtype a trained decoder's weights take for evaluation and sampling: 'auto' -> bf16 where training's
    `precision: auto` would pick bf16 autocast (bf16 matmuls measure faster here), else fp32; or 'fp32' / 'bf16'.
    The demo's evaluation in bf16: VQA 1.9x, teacher-forced 1.5x faster than fp32, the same answers and CE to four
    digits (README, screen 30)."""
    import torch

    dtypes = {"fp32": torch.float32, "32-true": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}
    if precision == "auto":
        precision = resolve_precision("auto", accelerator)
    if precision not in dtypes:
        raise UserError(f"precision must be auto, fp32 or bf16 for evaluation and sampling, got {precision!r}")
    return dtypes[precision]


# ---------------------------------------------------------------- trainer

def world_size(trainer_cfg) -> int:
    """Processes in the job: devices per node x nodes (devices 'auto' counts as 1 on CPU)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        n = len(devices)
    else:
        n = int(devices) if str(devices).isdigit() else 1
    return n * int(trainer_cfg.get("num_nodes", 1))


def _line_progress_base():
    from lightning.pytorch.callbacks import ProgressBar

    return ProgressBar


class LineProgress(_line_progress_base()):
    """Progress as plain log lines (step, rate, ETA, the bar's metrics) for non-interactive runs."""

    def __init__(self, every_s: float = 30.0):
        super().__init__()
        self.every_s, self._enabled = every_s, True
        self._t0 = self._last = 0.0

    def disable(self):
        self._enabled = False

    def enable(self):
        self._enabled = True

    def on_train_start(self, trainer, pl_module):
        self._t0 = self._last = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.time()
        if not self._enabled or not trainer.is_global_zero or now - self._last < self.every_s:
            return
        self._last = now
        step, total = trainer.global_step, trainer.max_steps
        rate = step / max(now - self._t0, 1e-9)
        left = [(total - step) / max(rate, 1e-9)] if total and total > 0 else []
        left += [c.time_remaining() for c in trainer.callbacks if type(c).__name__ == "Timer" and c.time_remaining()]
        eta = f" eta {min(left) / 60:.1f} min" if left else ""
        metrics = " ".join(f"{k}={float(v):.4g}" for k, v in self.get_metrics(trainer, pl_module).items()
                           if k != "v_num" and _is_number(v))
        print(f"step {step}/{total} {rate:.2f} it/s{eta} {metrics}", flush=True)

    def on_validation_end(self, trainer, pl_module):
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking:
            metrics = " ".join(f"{k}={float(v):.4g}" for k, v in trainer.callback_metrics.items()
                               if k.startswith("val") and _is_number(v))
            print(f"validation at step {trainer.global_step}: {metrics}", flush=True)


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def checkpoint_callbacks(run_dir: Path, every_n_steps: int, monitor: str, mode: str) -> list:
    """last.ckpt every `every_n_steps` steps and at the end (what resume=auto continues from: a kill loses at
    most that many steps) and best.ckpt by the validation metric."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class FinalLast(Callback):
        """last.ckpt at the last step too (Lightning's save_last skips it once any step has been saved), so a
        finished run continued with a larger max_steps (new task phases, say) starts where it ended."""

        def on_train_end(self, trainer, pl_module):
            trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")

    return [ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                            every_n_train_steps=every_n_steps),
            ModelCheckpoint(dirpath=run_dir / "checkpoints", monitor=monitor, mode=mode, filename="best", save_top_k=1),
            FinalLast()]


def audit_callback(run_dir: Path):
    """Per rank: the sample keys of every trained batch (audit/samples_rank{r}.jsonl, appended, so a
    resumed run continues the file) and a hash of the final weights (audit/weights_rank{r}.json).
    What the two-node and kill-and-resume tests compare."""
    import hashlib

    from lightning.pytorch.callbacks import Callback

    class Audit(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            keys = batch.get("keys") if isinstance(batch, dict) else None
            flat = [k for ks in keys for k in (ks if isinstance(ks, list) else [ks])] if keys else []
            path = run_dir / "audit" / f"samples_rank{trainer.global_rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, "keys": flat}) + "\n")

        def on_train_end(self, trainer, pl_module):
            h = hashlib.sha256()
            for k, v in sorted(pl_module.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().float().cpu().numpy().tobytes())
            write_json(run_dir / "audit" / f"weights_rank{trainer.global_rank}.json",
                       {"rank": trainer.global_rank, "world_size": trainer.world_size, "step": trainer.global_step,
                        "sha256": h.hexdigest()})

    return Audit()


def throughput_monitor(length_fn=None):
    """Lightning's ThroughputMonitor (items/s, FLOP/s, MFU); on CPU its MFU is taken against the matmul
    peak measured here (Lightning knows only GPU peaks), for the precision the run uses."""
    from lightning.pytorch.callbacks import ThroughputMonitor

    class _Monitor(ThroughputMonitor):
        def setup(self, trainer, pl_module, stage):
            super().setup(trainer, pl_module, stage)
            if trainer.strategy.root_device.type == "cpu":
                peaks = cpu_matmul_peaks()
                peak = peaks["bf16"] if "bf16" in str(trainer.precision) else peaks["fp32"]
                self.available_flops = int(peak * 1e9)
                for t in self._throughputs.values():
                    t.available_flops = self.available_flops

    return _Monitor(batch_size_fn=lambda b: len(b["input_ids"]) if isinstance(b, dict) and "input_ids" in b else 1,
                    length_fn=length_fn)


def _atomic_checkpoint_io():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Checkpoints written beside their target and renamed into place (a kill mid-save leaves the
        previous checkpoint whole), and read with weights_only=True: a checkpoint that would run code
        on load is refused, and a damaged one is reported in one line."""

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            import torch

            path = os.fspath(path)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return load_checkpoint_safely(path, map_location)

    return AtomicCheckpointIO()


def load_checkpoint_safely(path, map_location=None) -> dict:
    """torch.load with weights_only=True and errors a user can act on, in one line."""
    import pickle

    import torch

    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).splitlines()
        hint = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line), detail[0][:120])
        raise UserError(f"refusing to load {path}: it holds objects that would run code when unpickled ({hint})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({str(e).splitlines()[0][:120]})") from None


def resume_checkpoint(resume, run_dir: Path, expect: dict | None = None) -> str | None:
    """The checkpoint to resume from: resume=auto takes run_dir/checkpoints/last.ckpt if there is one, a
    path takes that file. `expect` maps a hyper-parameter name to the value this run needs; a
    checkpoint saved with another is refused, naming the difference."""
    if not resume:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if resume == "auto" else Path(resume)
    if resume == "auto" and not path.exists():
        return None
    hparams = load_checkpoint_safely(path).get("hyper_parameters", {})
    for key, want in (expect or {}).items():
        if hparams.get(key) != want:
            raise UserError(f"checkpoint {path} was trained with {key}={hparams.get(key)!r}, this run has {want!r}")
    return str(path)


def make_strategy(name, timeout_s: float | None, fsdp: dict | None, accelerator: str):
    """'ddp' with a process-group timeout of our choosing; 'fsdp' wrapped per decoder block (GPU only)."""
    from datetime import timedelta

    import torch

    if name == "fsdp":
        if accelerator == "cpu" or not torch.cuda.is_available():
            raise UserError("FSDP needs a GPU (Lightning's FSDP runs on CUDA only): use trainer=gpu or "
                            "trainer=multinode on CPU machines")
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

        blocks = {LlamaDecoderLayer, Qwen3DecoderLayer}
        fsdp = fsdp or {}
        return FSDPStrategy(auto_wrap_policy=blocks, sharding_strategy=fsdp.get("sharding_strategy", "FULL_SHARD"),
                            activation_checkpointing_policy=blocks if fsdp.get("activation_checkpointing") else None,
                            timeout=timedelta(seconds=timeout_s or 1800))
    if name == "ddp" and timeout_s:
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(timeout=timedelta(seconds=timeout_s))
    return name


def make_trainer(trainer_cfg: DictConfig | dict, run_dir: Path, callbacks: list, **overrides):
    """A Lightning Trainer from the `trainer` config group, logging CSV (and TensorBoard if installed)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = dict(OmegaConf.to_container(trainer_cfg, resolve=True)) if isinstance(trainer_cfg, DictConfig) else dict(trainer_cfg)
    t["precision"] = resolve_precision(t.get("precision", "auto"), t.get("accelerator", "auto"))
    t["strategy"] = make_strategy(t.pop("strategy", "auto"), t.pop("ddp_timeout_s", None), t.pop("fsdp", None),
                                  t.get("accelerator", "auto"))
    loggers = [CSVLogger(str(run_dir), name="logs", version="")]
    try:
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(str(run_dir), name="tb", version=""))
    except ImportError:
        pass
    from lightning.pytorch.callbacks import TQDMProgressBar

    # a live bar on a terminal; in logs (CI, nohup, SLURM) one plain line every so often instead
    if sys.stderr.isatty():
        callbacks = list(callbacks) + [TQDMProgressBar()]
    else:
        callbacks = list(callbacks) + [LineProgress(every_s=float(t.pop("log_every_s", 30)))]
        t["enable_progress_bar"] = True
    t.pop("log_every_s", None)
    t.update(overrides)
    return L.Trainer(default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks,
                     plugins=[_atomic_checkpoint_io()], **t)
