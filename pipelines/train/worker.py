"""One Ray Train rank of a job: model, optimiser, stream and the training loop.

``train_loop`` and ``first_step_loop`` are what Ray Train runs on every worker. ``Worker`` sets a rank up and
runs the loop; the checkpoint state, the held-out evaluation, the logs and the collectives are their own modules.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from blip_core import BlipLosses, BlipModel, alpha_at
from blip_core.transforms import eval_transform

from .. import storage
from ..karpathy import KarpathyDataset
from ..modeling import build_model, save_model
from ..optim import build_optimizer, build_scheduler, lr_at
from ..sources import Sample
from ..stream import derive_seed
from .checkpoints import load_state, restore_state, resume_position, save_state
from .collectives import mean_over_ranks
from .data import Collate, build_stream, epoch_plan
from .evaluation import evaluate
from .faults import inject_fault
from .logs import MetricsLog, TensorBoard
from .losses import SeparateLMLosses, freeze_unused
from .metrics import memory_stats
from .spec import EVAL, METRICS, PROMPTED, JobSpec, TrainError

log = logging.getLogger(__name__)

# Ray Train's controller takes each report off a one-slot queue when it polls the workers, so a report blocks
# until the previous one was taken: metrics go to Ray at most this often (every row still goes to metrics.jsonl
# and TensorBoard). The driver makes the controller poll faster than its default (``HEALTH_CHECK_INTERVAL_S``).
REPORT_EVERY_S = 5.0


def train_loop(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    worker = Worker(JobSpec(**config), ctx.get_world_rank(), ctx.get_world_size())
    worker.train()


def first_step_loop(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    worker = Worker(JobSpec(**config), ctx.get_world_rank(), ctx.get_world_size(), restore=False)
    losses = worker.first_step()
    if worker.rank == 0:
        storage.write_json(storage.join(worker.spec.job_dir, "first_step.json"), losses)
    worker.report(losses)


class _Window:
    """Sums over the steps since the last logged row: the losses stay on the device (no sync per step), the rest
    is host-side bookkeeping."""

    def __init__(self, n_losses: int, device: torch.device):
        self.losses = torch.zeros(n_losses, dtype=torch.float64, device=device)
        self.host = torch.zeros(5, dtype=torch.float64)  # steps, samples, data seconds, step seconds, report flag
        self.start = time.perf_counter()

    def add(self, losses: torch.Tensor, samples: int, data_s: float, step_s: float) -> None:
        self.losses += losses.double()
        self.host += torch.tensor([1, samples, data_s, step_s, 0], dtype=torch.float64)

    def reset(self) -> None:
        self.losses.zero_()
        self.host.zero_()
        self.start = time.perf_counter()


class Worker:
    """One Ray Train rank of a job: model, optimiser, stream, the loop, checkpoints, evaluation."""

    def __init__(self, spec: JobSpec, rank: int, world: int, restore: bool = True):
        import ray.train
        import ray.train.torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after tokenising
        self.started = time.perf_counter()
        self.spec, self.rank, self.world = spec, rank, world
        self.jc = spec.train
        if self.jc.batch_size % world:
            raise TrainError(f"batch_size {self.jc.batch_size} does not divide over {world} workers")
        self.batch = self.jc.batch_size // world
        self.device = ray.train.torch.get_device()
        self.gpu = self.device.type == "cuda"

        self.model = self._build_model()
        self.prompt = self.model.config.prompt if spec.job in PROMPTED else ""
        self.prompt_length = self._prompt_length() if self.prompt else 0
        # LM on the prompted caption and ITC/ITM on the caption alone need two tokenisations of each caption.
        self.separate_lm = bool(self.prompt) and "lm" in spec.objectives and len(spec.objectives) > 1
        self.losses = BlipLosses(self.model)
        self.losses.to(self.device)
        self.params = self._trainable_params()

        self.stream = build_stream(spec, self.jc, rank, world)
        self.plan = epoch_plan(
            self.stream,
            self.batch,
            self.jc.dataloader_workers,
            epochs=self.jc.epochs,
            max_steps=self.jc.max_steps,
            job=spec.job,
        )
        self.total_steps = sum(self.plan)
        self.optimizer = build_optimizer(self.params, lr=self.jc.lr, weight_decay=self.jc.weight_decay, fused=self.gpu)
        self.scheduler = build_scheduler(
            self.optimizer,
            lr=self.jc.lr,
            total_steps=self.total_steps,
            warmup_steps=self.jc.warmup_steps,
            warmup_lr=self.jc.warmup_lr,
            min_lr=self.jc.min_lr,
        )
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.resumed_from: int | None = None
        self.last_report = time.monotonic()
        if restore:
            self._restore(ray.train.get_checkpoint())
        self.ddp = ray.train.torch.prepare_model(
            SeparateLMLosses(self.losses) if self.separate_lm else self.losses,
            move_to_device=False,
            parallel_strategy_kwargs={"broadcast_buffers": False},
        )
        self.loader = self._build_loader()
        self.metrics = (
            MetricsLog(storage.join(spec.job_dir, METRICS), keep_through=self.resumed_from) if rank == 0 else None
        )
        self.tb = (
            TensorBoard(storage.join(spec.job_dir, "tensorboard"), purge_step=self.resumed_from) if rank == 0 else None
        )

    # ----------------------------------------------------------------------------------------------- setup
    def _build_model(self) -> BlipModel:
        """The job's model, with the same initial weights on every rank."""
        spec, jc = self.spec, self.jc
        torch.manual_seed(derive_seed(spec.seed, "init"))  # the same initial weights on every rank
        model = build_model(spec.run_config.model, jc, spec.init, spec.tokenizer, spec.bert_dir)
        if jc.max_text_length > model.config.text.max_positions:
            raise TrainError(
                f"train.{spec.job}.max_text_length ({jc.max_text_length}) exceeds the model's "
                f"text.max_positions ({model.config.text.max_positions})"
            )
        model.amp_dtype = torch.bfloat16 if (self.gpu and jc.bf16) else None
        return model

    def _trainable_params(self) -> list[torch.nn.Parameter]:
        """Freeze what the job's objectives never reach; the rest is what the optimiser trains."""
        frozen = freeze_unused(self.model, self.spec.objectives)
        if frozen and self.rank == 0:
            log.info(
                "%s: %d parameter tensors never reached by %s are frozen", self.spec.job, frozen, self.spec.objectives
            )
        return [p for p in self.model.parameters() if p.requires_grad]

    def _build_loader(self) -> DataLoader:
        nw = self.jc.dataloader_workers
        return DataLoader(
            self.stream,
            batch_size=self.batch,
            num_workers=nw,
            collate_fn=self._collate(),
            pin_memory=self.gpu,
            persistent_workers=nw > 0,
            prefetch_factor=4 if nw > 0 else None,
        )

    def _collate(self) -> Collate:
        return Collate(self.model.tokenizer, self.jc.max_text_length, self.prompt, separate_lm=self.separate_lm)

    def _prompt_length(self) -> int:
        ids, _ = self.model.tokenizer([self.prompt], add_sep=False)
        return ids.shape[1]  # [DEC] + the prompt's tokens, as BLIP's prompt_length

    def _fingerprint(self) -> dict:
        return {
            "plan": self.plan,
            "batch_size": self.jc.batch_size,
            "workers": self.world,
            "dataloader_workers": self.jc.dataloader_workers,
        }

    def _restore(self, checkpoint) -> None:
        state = load_state(checkpoint)
        if state is None:
            return
        restore_state(state, losses=self.losses, optimizer=self.optimizer, scheduler=self.scheduler)
        self.epoch, self.step_in_epoch, self.global_step = resume_position(state["position"], self.plan)
        self.resumed_from = self.global_step
        if state.get("fingerprint") != self._fingerprint() and self.rank == 0:
            log.warning(
                "%s: resuming at step %d under other settings (%s, now %s); the data order of the "
                "current epoch may differ",
                self.spec.job,
                self.global_step,
                state.get("fingerprint"),
                self._fingerprint(),
            )
        if self.rank == 0:
            log.info(
                "%s: resumed from checkpoint at step %d (epoch %d, step %d of it)",
                self.spec.job,
                self.global_step,
                self.epoch,
                self.step_in_epoch,
            )

    # ---------------------------------------------------------------------------------------------- stepping
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def step(self, batch: dict, epoch: int, step_in_epoch: int) -> dict[str, torch.Tensor]:
        """One optimizer step; returns the detached losses of this rank."""
        torch.manual_seed(derive_seed(self.spec.seed, "step", self.rank, self.global_step))
        b = self._to_device(batch)
        alpha = alpha_at(self.model.config.alpha, epoch, step_in_epoch, self.plan[0])
        lm = {k: b[k] for k in ("lm_input_ids", "lm_attention_mask") if k in b}
        out = self.ddp(
            b["images"],
            b["input_ids"],
            b["attention_mask"],
            image_ids=b["image_ids"],
            alpha=alpha,
            objectives=self.spec.objectives,
            prompt_length=self.prompt_length,
            **lm,
        )
        loss = sum(out.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.jc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.jc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        return {k: v.detach() for k, v in out.items()}

    def first_step(self) -> dict:
        """One step on this rank's rows of a fixed global batch (see ``first_step_losses``)."""
        human = next(s for s in self.spec.sources if s["kind"] == "karpathy")
        ds = KarpathyDataset(human["ann"], human["image_root"], transform=eval_transform(self.jc.image_size))
        pairs = ds.pairs()
        n = self.jc.batch_size
        if len(pairs) < n:
            raise TrainError(f"the human set has {len(pairs)} pairs, fewer than the batch of {n}")
        rows = range(self.rank * self.batch, (self.rank + 1) * self.batch)
        collate = self._collate()
        samples = [
            Sample(image=img, text=text, key=iid, image_id=iid, source="human")
            for img, text, iid in (pairs[i] for i in rows)
        ]
        out = self.step(collate(samples), 0, 0)
        return {k: mean_over_ranks(v, self.world) for k, v in out.items()}

    def report(self, metrics: dict, checkpoint=None, name: str | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        self.last_report = time.monotonic()

    # ---------------------------------------------------------------------------------------------- the loop
    def train(self) -> None:
        if self.rank == 0:
            log.info(
                "%s round %d: %d steps (%s per epoch), %d per rank x %d ranks, objectives %s, from %s%s; "
                "set up in %.1fs",
                self.spec.job,
                self.spec.round,
                self.total_steps,
                self.plan,
                self.batch,
                self.world,
                self.spec.objectives,
                self.spec.init,
                f", resuming at step {self.global_step}" if self.resumed_from else "",
                time.perf_counter() - self.started,
            )
        train_started = time.perf_counter()
        window = _Window(len(self.spec.objectives), self.device)
        first_epoch, skip = self.epoch, self.step_in_epoch
        for epoch in range(first_epoch, len(self.plan)):
            if self.global_step >= self.total_steps:
                break
            self._epoch(epoch, skip if epoch == first_epoch else 0, window)
        if self.rank == 0:
            log.info(
                "%s: %d steps in %.1fs",
                self.spec.job,
                self.global_step - (self.resumed_from or 0),
                time.perf_counter() - train_started,
            )
        self._finish()

    def _epoch(self, epoch: int, done: int, window: _Window) -> None:
        """The steps of ``epoch`` from its step ``done`` on, logging and checkpointing on the way."""
        jc = self.jc
        self.stream.set_epoch(epoch)
        batches = iter(self.loader)
        for _ in range(done):  # the resumed epoch: same order, so skip what the checkpoint has seen
            next(batches)
        while done < self.plan[epoch] and self.global_step < self.total_steps:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                raise TrainError(
                    f"rank {self.rank}: the stream ran out after {done} of {self.plan[epoch]} batches of epoch {epoch}"
                )
            t1 = time.perf_counter()
            inject_fault(self.global_step, self.rank)
            out = self.step(batch, epoch, done)
            done += 1
            n = len(batch["input_ids"])
            t2 = time.perf_counter()
            window.add(torch.stack([out[k] for k in self.spec.objectives]), n, t1 - t0, t2 - t0)
            last = self.global_step == self.total_steps
            if self.global_step % jc.log_every_steps == 0 or last:
                self._log(window, epoch)
                window.reset()
            if self.global_step % jc.checkpoint_every_steps == 0 or done == self.plan[epoch] or last:
                self._checkpoint(epoch, done)
        del batches

    def _log(self, window: _Window, epoch: int) -> None:
        """Window means over all ranks (one all-reduce), to metrics.jsonl, TensorBoard and Ray Train."""
        wall = time.perf_counter() - window.start
        obj = self.spec.objectives
        host = window.host.clone()
        last = self.global_step == self.total_steps
        if self.rank == 0 and (last or time.monotonic() - self.last_report >= REPORT_EVERY_S):
            host[-1] = 1  # rank 0 decides, the all-reduce tells the others: every rank must call report alike
        sums = torch.cat([window.losses, host.to(self.device)])
        if self.world > 1:
            dist.all_reduce(sums)
        sums = sums.tolist()
        steps, samples, data_s, step_s, to_ray = sums[len(obj) :]
        losses = {k: sums[i] / steps for i, k in enumerate(obj)}
        row = {
            "kind": "train",
            "step": self.global_step,
            "epoch": epoch,
            **losses,
            "loss": sum(losses.values()),
            "lr": self._lr_of_last_step(),
            "samples_per_s": samples / max(wall, 1e-9),
            "data_wait": data_s / max(step_s, 1e-9),
            "step_time_s": step_s / steps,
            **memory_stats(self.gpu),
        }
        if self.rank == 0:
            self.metrics.append(row)
            self.tb.scalars(row, self.global_step)
            log.info(
                "%s step %d/%d epoch %d: %s lr %.2e, %.1f samples/s, data wait %.0f%%",
                self.spec.job,
                self.global_step,
                self.total_steps,
                epoch,
                " ".join(f"{k} {v:.4f}" for k, v in losses.items()),
                row["lr"],
                row["samples_per_s"],
                100 * row["data_wait"],
            )
        if to_ray:
            self.report(row)

    def _lr_of_last_step(self) -> float:
        return lr_at(
            self.global_step - 1,
            lr=self.jc.lr,
            total_steps=self.total_steps,
            warmup_steps=self.jc.warmup_steps,
            warmup_lr=self.jc.warmup_lr,
            min_lr=self.jc.min_lr,
        )

    def _checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        from ray.train import Checkpoint

        name = f"step_{self.global_step:08d}"
        row = {"kind": "checkpoint", "step": self.global_step, "epoch": epoch}
        with tempfile.TemporaryDirectory(prefix="capfilt-ckpt-", ignore_cleanup_errors=True) as tmp:
            checkpoint = None
            if self.rank == 0:
                self.metrics.flush()  # before the checkpoint exists: a resume never misses rows up to it
                self.tb.flush()
                save_state(
                    tmp,
                    losses=self.losses,
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    position={"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": self.global_step},
                    fingerprint=self._fingerprint(),
                )
                checkpoint = Checkpoint.from_directory(tmp)
            self.report(row, checkpoint=checkpoint, name=name)

    # ----------------------------------------------------------------------------------------- the ending
    def _finish(self) -> None:
        t0 = time.perf_counter()
        metrics = evaluate(
            self.model,
            self.spec.test,
            self.jc,
            self.spec.objectives,
            rank=self.rank,
            world=self.world,
            device=self.device,
            prompt=self.prompt,
            prompt_length=self.prompt_length,
        )
        eval_s = time.perf_counter() - t0
        if self.rank == 0:
            self._publish(metrics, eval_s)
        self.report({"kind": "final", "step": self.global_step, **{f"eval_{k}": v for k, v in metrics.items()}})

    def _publish(self, metrics: dict, eval_s: float) -> None:
        """Rank 0: the final model, the eval row of metrics.jsonl and TensorBoard, and eval.json."""
        model_id = save_model(_cpu_copy(self.model), storage.join(self.spec.job_dir, "model"))
        row = {"kind": "eval", "step": self.global_step, "epoch": len(self.plan) - 1, **metrics, "eval_seconds": eval_s}
        self.metrics.append(row)
        self.metrics.flush()
        self.tb.scalars({f"eval/{k}": v for k, v in metrics.items()}, self.global_step, prefix="")
        self.tb.close()
        storage.write_json(
            storage.join(self.spec.job_dir, EVAL),
            {
                "job": self.spec.job,
                "round": self.spec.round,
                "final_step": self.global_step,
                "model_id": model_id,
                "metrics": metrics,
                "resumed_from_step": self.resumed_from,
                "test_set": self.spec.test["ann"],
            },
        )
        log.info(
            "%s round %d: evaluation %s (%.1fs); model %s", self.spec.job, self.spec.round, metrics, eval_s, model_id
        )


def _cpu_copy(model: BlipModel) -> BlipModel:
    if model.device.type == "cpu":
        return model
    import copy

    return copy.deepcopy(model).cpu()
