"""CPU training of the reference model (one end-to-end stage, as upstream) and of the dense baseline.

Reproducible: the same data, options and seed give the same weights and accuracies on the same machine
(torch seeded, one numpy generator for the data order and every random draw of the training forward, a
fixed thread count). The best epoch on the validation split is kept, then evaluated on the test split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from adafocus.dataset import class_names, load_split
from adafocus.errors import AdaFocusError
from adafocus.models.config import ModelConfig
from adafocus.models.dense import KIND as DENSE_KIND
from adafocus.models.dense import DenseBaseline, dense_gflops
from adafocus.models.presets import preset_config
from adafocus.models.uniadafocus import UniAdaFocus
from adafocus.training.data import Clips, load_clips, to_input
from adafocus.training.losses import adafocus_loss, dense_loss, forward_train

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainOptions:
    """How to train. Defaults are what the demo model was trained with (see the report in the README)."""

    preset: str = "tiny"
    dense: bool = False  # train the dense baseline instead of the adaptive model
    epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # 'sgd': upstream's SGD (momentum 0.9) with its per-module lr multipliers
    grad_clip: float | None = 20.0  # max gradient norm (upstream's TSM training clips at 20; base does not)
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0 (per iteration)
    norm_ratio: float = 1.0  # weight of mean((scale - 1)^2) on the spatial policy's box scales
    mc_samples: int = 32  # Monte-Carlo samples of the temporal head (upstream: 128)
    dense_frames: int = 8  # dense baseline: random frames per video per training step (all N at evaluation)
    seed: int = 0
    threads: int = 2
    max_videos: int | None = None  # use only the first videos of each split (quick runs, tests)
    eval_batch: int = 32
    eval_every: int = 5  # validate every that many epochs, and in the last 3 (upstream: every 5, last 10)
    init_local: str | None = None  # start local_CNN from this checkpoint's (e.g. the dense baseline's)
    config: dict = field(default_factory=dict)  # overrides of the preset's ModelConfig fields

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise AdaFocusError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.epochs < 1 or self.batch_size < 2:
            raise AdaFocusError("need epochs >= 1 and batch_size >= 2 (BatchNorm)")


@dataclass
class TrainResult:
    """Accuracy per exit (adaptive: exit 0 = glance only .. exit K = full model; dense: one entry)."""

    out: Path
    kind: str  # 'adafocus' or 'dense'
    val_accuracy: list[float]
    test_accuracy: list[float]
    best_epoch: int
    seconds: float
    gflops: list[float]  # per exit (adaptive) or per video (dense)
    history: list[dict]

    def summary(self) -> str:
        if self.kind == DENSE_KIND:
            return (f"dense: val {self.val_accuracy[0]:.1%}, test {self.test_accuracy[0]:.1%} at "
                    f"{self.gflops[0]:.3f} GFLOPs/video")
        return (f"adafocus: val {self.val_accuracy[-1]:.1%}, test {self.test_accuracy[-1]:.1%} (glance only: "
                f"val {self.val_accuracy[0]:.1%}, test {self.test_accuracy[0]:.1%}) at "
                f"{self.gflops[-1]:.3f} GFLOPs/video")


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, clips: Clips, batch_size: int = 32) -> list[float]:
    """Top-1 accuracy at every exit (adaptive model: ``[K + 1]``, eval path; dense: ``[1]``)."""
    was_training = model.training
    model.eval()
    correct = None
    for start in range(0, len(clips), batch_size):
        x = to_input(clips.frames[start:start + batch_size], model.cfg)
        y = torch.from_numpy(clips.labels[start:start + batch_size])
        # the adaptive model takes upstream's [B, N*3, S, S] input and returns [B, K+1, C]
        logits = model(x).unsqueeze(1) if isinstance(model, DenseBaseline) else model(x.flatten(1, 2))
        hits = (logits.argmax(-1) == y[:, None]).sum(0)
        correct = hits if correct is None else correct + hits
    model.train(was_training)
    return [float(c) / len(clips) for c in correct]


# -------------------------------------------------------------------------------------------- training
def param_groups(model: torch.nn.Module, options: TrainOptions) -> list[dict]:
    """Per-module lr multipliers. SGD: upstream's (policies 0.2, glance 0.5, local 1, classifier 20), whose
    classifier x20 makes up for heads that start from scratch beside ImageNet-initialised backbones. AdamW:
    one rate for all, since here every module starts from scratch (and Adam scales steps per parameter)."""
    if options.optimizer != "sgd" or isinstance(model, DenseBaseline):
        return [{"params": list(model.parameters()), "lr_mult": 1.0}]
    mults = {"temporal_policy": 0.2, "spatial_policy": 0.2, "global_CNN": 0.5, "global_CNN_fc": 0.5,
             "aux_fc": 0.5, "local_CNN": 1.0, "local_CNN_fc": 1.0, "classifier": 20.0}
    return [{"params": list(getattr(model, name).parameters()), "lr_mult": m} for name, m in mults.items()]


def _memory_format(model: torch.nn.Module, fmt: torch.memory_format) -> None:
    """Channels-last backbones: on the CPU (oneDNN) MobileNetV2's depthwise convs and BatchNorms train
    several times faster in it (measured: 0.7 s against 6 s fwd+bwd of 128 glance frames, 2 threads)."""
    for name in ("global_CNN", "local_CNN"):
        if hasattr(model, name):
            getattr(model, name).to(memory_format=fmt)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train_step(model, frames: np.ndarray, labels: np.ndarray, options: TrainOptions,
                rng: np.random.Generator) -> dict[str, float]:
    y = torch.from_numpy(labels)
    if isinstance(model, DenseBaseline):
        n = frames.shape[1]
        keep = min(options.dense_frames, n)
        idx = np.sort(np.stack([rng.choice(n, keep, replace=False) for _ in range(len(frames))]), axis=1)
        x = to_input(np.take_along_axis(frames, idx[:, :, None, None, None], axis=1), model.cfg)
        parts = dense_loss(model(x), y)
    else:
        out = forward_train(model, to_input(frames, model.cfg), rng, options.mc_samples)
        parts = adafocus_loss(out, y, options.norm_ratio)
    if not torch.isfinite(parts["loss"]):
        raise AdaFocusError(f"training diverged (loss {float(parts['loss'])}); try a lower --lr")
    parts["loss"].backward()
    if options.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in parts.items()}


def init_local_encoder(model: torch.nn.Module, path: str | Path) -> str:
    """Copy ``local_CNN.*`` weights from another checkpoint (adafocus's, dense or adaptive) into ``model``.

    Upstream starts both encoders from ImageNet weights; the demo has no such weights, so it may start the
    local encoder from the dense baseline trained on the same data (the same ResNet on whole frames).
    """
    from adafocus.models.checkpoint import read

    state = read(path)["state_dict"]
    prefix = "local_CNN."
    theirs = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    mine = model.local_CNN.state_dict()
    if set(theirs) != set(mine) or any(theirs[k].shape != mine[k].shape for k in mine):
        raise AdaFocusError(f"{path}: its local_CNN does not match this model's "
                            f"({len(theirs)} vs {len(mine)} tensors, or different shapes)")
    model.local_CNN.load_state_dict(theirs)
    return f"local encoder initialised from {path}"


def build_config(preset: str, classes: list[str], overrides: dict) -> ModelConfig:
    cfg = preset_config(preset)
    return cfg.replace(**{**overrides, "num_classes": len(classes), "labels": list(classes)})


def train(data: str | Path, out: str | Path, options: TrainOptions | None = None,
          log: Callable[[str], None] = print, progress: bool = True,
          on_epoch: Callable[[int, torch.nn.Module, dict], None] | None = None) -> TrainResult:
    """Train on ``data`` (a directory with train/val/test CSVs, see :mod:`adafocus.dataset`), write ``out``.

    ``log`` gets one line per epoch; ``progress`` shows rich progress bars for decoding and training;
    ``on_epoch(epoch, model, record)`` is called after each epoch (the model in train mode).
    The checkpoint is adafocus's format with a ``training`` record (options, seed, data sizes, epochs,
    best epoch, accuracies, time); the dense baseline's also has ``model: 'dense'``.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    options = options or TrainOptions()
    options.validate()
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    started = time.perf_counter()

    classes = class_names(data)
    cfg = build_config(options.preset, classes, options.config)
    splits = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        for split in ("train", "val", "test"):
            videos = load_split(data, split)[:options.max_videos]
            task = bar.add_task(f"decode {split}", total=len(videos), info="")
            splits[split] = load_clips(videos, classes, cfg, lambda i, n, task=task: bar.update(task, completed=i))
    train_clips = splits["train"]
    if len(train_clips) < options.batch_size:
        raise AdaFocusError(f"{len(train_clips)} training videos is fewer than one batch of {options.batch_size}")
    log(f"data {data}: {len(classes)} classes, " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        + f" videos ({time.perf_counter() - started:.1f} s to decode)")

    model = DenseBaseline(cfg) if options.dense else UniAdaFocus(cfg)
    if options.init_local:
        log(init_local_encoder(model, options.init_local))
    model.train()
    _memory_format(model, torch.channels_last)
    groups = param_groups(model, options)
    if options.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=options.lr, momentum=0.9, weight_decay=options.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay)
    per_epoch = len(train_clips) // options.batch_size
    total = per_epoch * options.epochs
    warmup = int(options.warmup_epochs * per_epoch)

    history: list[dict] = []
    best = (-1.0, -1, None)
    step = 0
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=total, info="")
        for epoch in range(1, options.epochs + 1):
            t0 = time.perf_counter()
            order = rng.permutation(len(train_clips))
            sums: dict[str, float] = {}
            for i in range(per_epoch):
                idx = np.sort(order[i * options.batch_size:(i + 1) * options.batch_size])
                lr = _lr_at(step, total, warmup, options.lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_mult"]
                optimizer.zero_grad(set_to_none=True)
                parts = _train_step(model, train_clips.frames[idx], train_clips.labels[idx], options, rng)
                optimizer.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                step += 1
                bar.update(task, advance=1, info=f"epoch {epoch}/{options.epochs} loss {parts['loss']:.3f}")
            record = {"epoch": epoch, "lr": lr, "seconds": time.perf_counter() - t0,
                      **{k: v / per_epoch for k, v in sums.items()}}
            exits = ""
            if epoch % options.eval_every == 0 or epoch > options.epochs - 3:
                val = evaluate(model, splits["val"], options.eval_batch)
                record["val_accuracy"] = val
                if val[-1] >= best[0]:
                    best = (val[-1], epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
                exits = f"val {val[-1]:.1%}" if len(val) == 1 else f"val exit0 {val[0]:.1%} final {val[-1]:.1%}"
            history.append(record)
            if on_epoch is not None:
                on_epoch(epoch, model, record)
            terms = " ".join(f"{k} {record[k]:.3f}" for k in sums if k != "loss")
            line = (f"epoch {epoch:>3}/{options.epochs} loss {record['loss']:.4f}" + (f" ({terms})" if terms else "")
                    + (f" {exits}" if exits else "") + f" [{record['seconds']:.0f} s, lr {lr:.2e}]")
            if progress:
                bar.console.print(line)
            else:
                log(line)

    model.load_state_dict(best[2])
    model.eval()
    _memory_format(model, torch.contiguous_format)  # saved weights in the default layout
    val = evaluate(model, splits["val"], options.eval_batch)
    test = evaluate(model, splits["test"], options.eval_batch)
    seconds = time.perf_counter() - started
    if options.dense:
        gflops = [dense_gflops(model)]
    else:
        from adafocus.models.flops import count_model_flops

        gflops = list(count_model_flops(model).exits)
    result = TrainResult(Path(out), DENSE_KIND if options.dense else "adafocus", val, test, best[1], seconds, gflops,
                         history)
    record = {"options": asdict(options), "data": str(data), "classes": classes,
              "videos": {k: len(v) for k, v in splits.items()}, "epochs": options.epochs, "best_epoch": best[1],
              "val_accuracy": val, "test_accuracy": test, "gflops": gflops, "seconds": round(seconds, 1),
              "threads": options.threads, "torch": str(torch.__version__), "history": history}
    extra = {"training": record}
    if options.dense:
        extra["model"] = DENSE_KIND
    from adafocus.models.checkpoint import save

    preset = None if options.config else options.preset  # overridden configs no longer match the preset
    save(model, out, preset=preset, extra=extra)
    log(result.summary() + f"; best epoch {best[1]}, {seconds / 60:.1f} min; wrote {out}")
    return result
