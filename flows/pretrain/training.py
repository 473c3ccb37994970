"""`whence pretrain`'s training with Ray Train: `TorchTrainer` runs `train_loop` on every worker (DDP over
`workers` workers, GPUs when the cluster has them, bfloat16 autocast on GPU).

AdamW, linear warm-up then cosine decay, gradient clipping. Each step takes `batch_size` windows (shared out among
the workers) from a fresh random order of the windows each epoch. Training stops after `steps` steps or
`time_limit` minutes; with a time limit the learning rate decays with whichever is further along. Workers
checkpoint at every log step, and a failed worker group is restarted from the latest checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path

from flows.cluster import ClusterSettings
from flows.pretrain.data import PretrainData, Windows
from flows.pretrain.settings import PretrainConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions with no loss term (cross_entropy's ignore_index)
EVAL_SUBSET_WINDOWS = 32  # validation windows scored at each log step (the full set is scored at the end)
WARMUP_FRACTION, MAX_WARMUP_STEPS = 0.1, 200
MAX_FAILURES = 3  # worker-group restarts, each resuming from the latest checkpoint
CHECKPOINT_FILE = "train_state.pt"
FINAL_LR_FRACTION = 0.1  # the cosine schedule ends at this fraction of --lr
ADAM_BETAS, WEIGHT_DECAY, GRAD_CLIP_NORM = (0.9, 0.95), 0.1, 1.0


def train_on_ray(model_config, config: PretrainConfig, data: PretrainData, cluster: ClusterSettings,
                 storage_path: str | None) -> dict:
    """Run `train_loop` on `cluster.workers` Ray Train workers; the rank-0 worker's result (weights, losses).

    The workers checkpoint at every log step; a failed worker group is restarted (up to MAX_FAILURES times) and
    resumes from the latest checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flows.cluster import connect

    started_here = not ray.is_initialized()
    connect(cluster.address)  # ray.init(address) unless this process is already connected
    try:
        resources = ray.cluster_resources()
        use_gpu = resources.get("GPU", 0) >= 1
        # On CPU, share the cluster's cores among the workers; each worker sets torch's thread count to its share.
        cpus = 1 if use_gpu else max(1, int(resources.get("CPU", 1)) // cluster.workers)
        loop_config = loop_config_for(model_config, config, ray.put(data.train), ray.put(data.val), cpus)
        with tempfile.TemporaryDirectory(prefix="whence-pretrain-") as scratch:
            trainer = TorchTrainer(
                train_loop,
                train_loop_config=loop_config,
                scaling_config=ScalingConfig(num_workers=cluster.workers, use_gpu=use_gpu,
                                             resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})}),
                run_config=RunConfig(
                    name=f"whence-pretrain-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                    storage_path=storage_path or scratch,
                    failure_config=FailureConfig(max_failures=MAX_FAILURES),
                    checkpoint_config=CheckpointConfig(num_to_keep=1),
                    # Ray Train's own INFO lines (one per report) would drown the loss log.
                    logging_config=LoggingConfig(log_level="WARNING"),
                ),
            )
            result = trainer.fit()
        return result.return_value
    finally:
        if started_here:
            ray.shutdown()


def loop_config_for(model_config, config: PretrainConfig, train, val, cpus: int) -> dict:
    """`train_loop`'s settings: the model, the windows (object references, or the Windows themselves for
    `train_single`), the schedule of `config`, and the threads of each worker on CPU."""
    return {
        "model_config": model_config.to_dict(),
        "train_ref": train,
        "val_ref": val,
        "steps": config.total_steps,
        "time_limit_s": None if config.time_limit is None else 60.0 * config.time_limit,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "log_every": config.log_every,
        "cpus_per_worker": cpus,
    }


def train_loop(loop_config: dict) -> dict | None:
    """Ray Train's per-worker loop: DDP training, then the validation loss over every validation window.

    Every worker takes its share of each global batch and of the validation windows; rank 0 returns the weights
    (numpy arrays), the losses and the loss history.
    """
    return WorkerTraining(loop_config).run()


class WorkerTraining:
    """One Ray Train worker's training: its model (DDP-wrapped), optimizer, clock and the order of windows, and
    how far it has got (step, history, tokens seen), restored from the latest checkpoint after a restart."""

    def __init__(self, loop_config: dict, context: _RayTrainContext | _LocalContext | None = None):
        import numpy as np
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        self.context = context = context or _RayTrainContext()
        self.rank, self.world, self.device = context.rank, context.world, context.device
        if self.device.type == "cpu":
            torch.set_num_threads(int(loop_config["cpus_per_worker"]))
        self.loop_config = loop_config
        self.train, self.val = context.get(loop_config["train_ref"]), context.get(loop_config["val_ref"])
        self.steps, seed = loop_config["steps"], loop_config["seed"]
        self.per_worker = loop_config["batch_size"] // self.world

        torch.manual_seed(seed)  # the same initial weights on every worker (DDP also broadcasts rank 0's)
        model = LlamaForCausalLM(LlamaConfig.from_dict(loop_config["model_config"]))
        self.parameters = sum(p.numel() for p in model.parameters())
        saved = context.load_state()  # after a restart: weights, optimizer, step, elapsed time, history
        if saved is not None:
            model.load_state_dict(saved["model"])
        self.model = context.prepare_model(model)
        self.optimizer = _optimizer(self.model, loop_config["lr"])
        self.clock = _Clock(self.steps, loop_config["time_limit_s"], self.device, self.world)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        self.eval_subset = np.arange(min(EVAL_SUBSET_WINDOWS, len(self.val)))
        # The window order's seed: the run's seed unless a separate one is given (`whence eval lds` trains
        # several orders from one initialisation).
        data_seed = loop_config.get("data_seed")
        self.batches = _global_batches(len(self.train), loop_config["batch_size"], seed if data_seed is None
                                       else data_seed)
        self.step, self.history, self.tokens_seen = 0, [], 0
        self.interval_loss, self.interval_steps = 0.0, 0
        if saved is not None:
            self._resume(saved)

    def _resume(self, saved: dict) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step, self.history, self.tokens_seen = saved["step"], saved["history"], saved["tokens_seen"]
        self.clock.started -= saved["elapsed"]
        for _ in range(self.step):  # replay the window order up to where the checkpoint was taken
            next(self.batches)
        if self.rank == 0:
            log.info("resumed from the checkpoint at step %d (%.0fs of training)", self.step, saved["elapsed"])

    def run(self) -> dict | None:
        import numpy as np

        self.interval_started = time.time()
        self.model.train()
        while not self.clock.done(self.step):
            lr = self._train_step()
            if self.step % self.loop_config["log_every"] == 0 or self.clock.done(self.step):
                self._log_and_checkpoint(lr)
        seconds = self.clock.elapsed()
        val_loss = _evaluate(self.model, self.val, np.arange(len(self.val)), self.device, self.autocast, self.rank,
                             self.world)
        self.context.report({"step": self.step, "val_loss": val_loss}, None)
        return self._result(val_loss, seconds) if self.rank == 0 else None

    def _train_step(self) -> float:
        """One optimizer step on this worker's share of the next global batch; returns its learning rate."""
        import torch

        self.step += 1
        lr = self.loop_config["lr"] * _lr_multiplier(self.step, self.clock.progress(self.step), self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = next(self.batches)  # (batch_size,) window indices, the same on every worker
        mine = rows[self.rank * self.per_worker : (self.rank + 1) * self.per_worker]
        input_ids, labels = _batch(self.train, mine, self.device)
        with self.autocast:
            logits = self.model(input_ids=input_ids).logits  # (b, T, V)
        loss = _next_token_loss(logits, labels, reduction="mean")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP_NORM)
        self.optimizer.step()
        self.tokens_seen += int(self.train.lengths[rows].sum())
        self.interval_loss, self.interval_steps = self.interval_loss + loss.item(), self.interval_steps + 1
        return lr

    def _log_and_checkpoint(self, lr: float) -> None:
        """The losses since the last log step and on the validation subset, into the history; a checkpoint."""
        val_subset = _evaluate(self.model, self.val, self.eval_subset, self.device, self.autocast, self.rank,
                               self.world)
        elapsed = self.clock.elapsed()
        metrics = {"step": self.step, "train_loss": self.interval_loss / self.interval_steps,
                   "val_loss_subset": val_subset, "lr": lr, "tokens_seen": self.tokens_seen,
                   "seconds": round(elapsed, 1), "tokens_per_second": round(self.tokens_seen / elapsed)}
        self.history.append(metrics)
        if self.rank == 0:
            log.info("step %d/%d: train loss %.4f, val loss (first %d windows) %.4f, lr %.2e, %d tokens/s, "
                     "%.0fs", self.step, self.steps, metrics["train_loss"], len(self.eval_subset), val_subset, lr,
                     metrics["tokens_per_second"], time.time() - self.interval_started)
        state = {"model": _unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "history": self.history, "tokens_seen": self.tokens_seen,
                 "elapsed": self.clock.elapsed()}
        self.context.report(metrics, state if self.rank == 0 else None)
        self.interval_loss, self.interval_steps, self.interval_started = 0.0, 0, time.time()

    def _result(self, val_loss: float, seconds: float) -> dict:
        """Rank 0's result: the weights as numpy arrays, the losses, the history and what training took."""
        threads = f" ({self.loop_config['cpus_per_worker']} threads)" if self.device.type == "cpu" else ""
        return {
            "state_dict": {name: t.detach().cpu().numpy() for name, t in _unwrap(self.model).state_dict().items()},
            "val_loss": val_loss,
            "history": self.history,
            "steps": self.step,
            "stopped_by_time_limit": self.step < self.steps,
            "tokens_seen": self.tokens_seen,
            "seconds": seconds,
            "parameters": self.parameters,
            "device": f"{self.world} x {self.device.type}" + threads,
        }


class _RayTrainContext:
    """A Ray Train worker's place in its group: rank, world size, device, DDP, checkpoints and reports."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    @staticmethod
    def get(ref):
        import ray

        return ray.get(ref)

    @staticmethod
    def prepare_model(model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    @staticmethod
    def load_state() -> dict | None:
        return _load_train_state()

    @staticmethod
    def report(metrics: dict, state: dict | None) -> None:
        _report_with_checkpoint(metrics, state)


class _LocalContext:
    """One worker alone, in this process (a plain Ray task, or no Ray at all): no DDP, no checkpoints; the data
    is passed as it is rather than as object references."""

    rank, world = 0, 1

    def __init__(self):
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @staticmethod
    def get(value):
        return value

    def prepare_model(self, model):
        return model.to(self.device)

    @staticmethod
    def load_state() -> None:
        return None

    @staticmethod
    def report(metrics: dict, state: dict | None) -> None:
        """Nothing to report to: the history keeps the metrics."""


def train_single(loop_config: dict) -> dict:
    """`train_loop`'s training by one worker in this process, with no Ray Train (for many small models trained
    side by side as Ray tasks, as `whence eval lds` does). `loop_config` is train_on_ray's, with the windows
    themselves under "train_ref" and "val_ref", and optionally "data_seed": the seed of the window order
    (default: "seed", which then drives both the initialisation and the order, as in `whence pretrain`)."""
    return WorkerTraining(loop_config, _LocalContext()).run()


def _unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def _report_with_checkpoint(metrics: dict, state: dict | None) -> None:
    """ray.train.report on every worker (it is a barrier); the worker passing `state` also saves a checkpoint."""
    import ray.train
    import torch

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="whence-pretrain-ckpt-") as directory:
        torch.save(state, Path(directory) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _load_train_state() -> dict | None:
    """The training state of the latest checkpoint of this run, if Ray Train restarted the workers."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        # Tensors, numbers, strings, lists and dicts only: nothing to unpickle that could run code.
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _optimizer(model, lr: float):
    """AdamW with weight decay on matrices (embeddings and linear layers), none on norm weights."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS)


class _Clock:
    """How far training has got: the larger of the fraction of steps done and the fraction of the time limit used.

    With several workers, rank 0's elapsed time is broadcast every step so that all stop at the same step.
    """

    def __init__(self, steps: int, time_limit_s: float | None, device, world: int):
        self.steps, self.time_limit_s, self.device, self.world = steps, time_limit_s, device, world
        self.started = time.time()
        self._synced: tuple[int, float] = (-1, 0.0)  # (step, elapsed seconds agreed on at that step)

    def elapsed(self) -> float:
        return time.time() - self.started

    def _agreed_elapsed(self, step: int) -> float:
        if self._synced[0] != step:
            elapsed = self.elapsed()
            if self.world > 1:
                import torch
                import torch.distributed as dist

                value = torch.tensor([elapsed], dtype=torch.float64, device=self.device)
                dist.broadcast(value, src=0)
                elapsed = float(value.item())
            self._synced = (step, elapsed)
        return self._synced[1]

    def progress(self, step: int) -> float:
        """In [0, 1]: the fraction of training done before `step` runs."""
        done = (step - 1) / self.steps
        if self.time_limit_s is not None:
            done = max(done, self._agreed_elapsed(step) / self.time_limit_s)
        return min(1.0, done)

    def done(self, step: int) -> bool:
        """True once `step` steps have run and training should stop (all steps, or the time limit reached)."""
        if step >= self.steps:
            return True
        return self.time_limit_s is not None and step > 0 and self._agreed_elapsed(step) >= self.time_limit_s


def _lr_multiplier(step: int, progress: float, steps: int) -> float:
    """Multiplier of the peak lr: linear warm-up, then cosine decay to FINAL_LR_FRACTION as `progress` goes to 1.

    Warm-up ends after MAX_WARMUP_STEPS steps or a WARMUP_FRACTION of training (by steps or time), whichever is
    first; `progress` (steps or time, whichever is further along) then drives the decay.
    """
    warm = max(step / MAX_WARMUP_STEPS, progress / WARMUP_FRACTION, step / max(1.0, WARMUP_FRACTION * steps))
    if warm < 1:
        return warm
    decay_start = min(WARMUP_FRACTION, MAX_WARMUP_STEPS / steps)  # where warm-up ends when steps decide
    decay = min(1.0, max(0.0, (progress - decay_start) / (1 - decay_start)))
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * decay))


def _global_batches(num_windows: int, batch_size: int, seed: int):
    """Endless batches of window indices: each epoch a new random order, batches running across epochs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pending = np.empty(0, dtype=np.int64)
    while True:
        while len(pending) < batch_size:
            pending = np.concatenate([pending, rng.permutation(num_windows)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _batch(windows: Windows, rows, device):
    """(input_ids, labels), both (b, T) int64; labels are IGNORE_INDEX on padding.

    Padding is on the right and attention is causal, so no real token attends to a pad: no attention mask needed.
    """
    import numpy as np
    import torch

    input_ids = torch.from_numpy(windows.tokens[rows].astype(np.int64))  # (b, T)
    labels = input_ids.clone()
    labels[torch.arange(labels.shape[1]) >= torch.from_numpy(windows.lengths[rows])[:, None]] = IGNORE_INDEX
    return input_ids.to(device), labels.to(device)


def _next_token_loss(logits, labels, reduction: str):
    """-log p(x_t | x_<t) over positions t >= 2 (logits at t-1 predict the label at t), ignoring padding."""
    import torch.nn.functional as F

    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def _evaluate(model, windows: Windows, rows, device, autocast, rank: int, world: int,
              batch_size: int = 32) -> float:
    """Mean loss per predicted token over windows[rows]; each worker scores every world-th row, then a sum."""
    import torch
    import torch.distributed as dist

    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, predicted tokens)
    mine = rows[rank::world]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            input_ids, labels = _batch(windows, mine[start : start + batch_size], device)
            with autocast:
                logits = model(input_ids=input_ids).logits
            total[0] += _next_token_loss(logits, labels, reduction="sum").double()
            total[1] += (labels[:, 1:] != IGNORE_INDEX).sum()
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))
