"""Training jobs on Ray Train: ``capfilt pretrain`` and ``capfilt finetune --role captioner|filter|shared``.

Each job is one ``TorchTrainer`` run of N workers (CPU/gloo here, GPU/NCCL on a cluster) over a stream of
image-text pairs (``ShardStream``, one shard of the stream per rank, padded so every rank runs the same
number of steps):

  pretrain   ITC + ITM + LM jointly. Round 1: the web shards plus the human set; round K > 1: round K-1's
             bootstrapped dataset (``<root>/round=<K-1>/dataset/``). From scratch (the paper's choice for the
             next round; the text side optionally from a BERT directory) or from a checkpoint.
  captioner  LM only, on the human set, with the prompt "a picture of " (prompt tokens out of the loss).
  filter     ITC + ITM on the human set; captions of one image are positives of each other (image ids).
  shared     the paper's ablation: one model for both roles, LM on the prompted caption and ITC + ITM on the
             caption alone (as the filter sees texts), in one step. Not part of the flow; see
             benchmarks/capfilt_experiment.py.
The fine-tunes start from round K's pre-trained ``model/`` and are separate models (sharing them hurts).

Outputs under ``<root>/round=K/<job>/`` on any fsspec URL:
  model/           the final checkpoint in our format (``BlipModel.from_pretrained``)
  metrics.jsonl    one JSON per logged step: step, epoch, each loss, loss, lr, samples_per_s, data_wait
                   (share of step time spent waiting for data), memory; then one ``kind: eval`` row
  eval.json        the held-out evaluation: retrieval R@1/R@5 (pretrain, filter), caption loss (captioner)
  tensorboard/     the same scalars for TensorBoard (rank 0)
  ray_train/       Ray Train's run: checkpoints ``step_NNNNNNNN/state.pt`` every epoch and every N steps
  _COMMITTED       written last, by the driver; a committed job is a no-op when rerun

Fault tolerance. A checkpoint holds the model with BlipLosses' momentum encoders and queues, the optimiser,
the scheduler and the data position (epoch, step in epoch, global step). ``FailureConfig(max_failures)``
restarts crashed workers from the latest one; a job killed outright and rerun finds Ray Train's snapshot in
``ray_train/`` and resumes from it. The data order of an epoch is a function of (seed, epoch, ranks x
DataLoader workers), so a resumed epoch skips the batches already done; the RNG is reseeded from the global
step before each step, so a resumed run takes the same random choices (ITM negatives) as one never stopped.

DDP wraps ``BlipLosses`` with ``broadcast_buffers=False``: the feature queues are identical on every rank by
construction (every rank enqueues the same gathered batch), and broadcasting them each step would cost a
queue's size of traffic for nothing. Parameters the job's objectives never reach (the ITM head for the
captioner, the decoder's self-attention for the filter) are frozen, so DDP needs no unused-parameter search.

For tests: ``first_step_losses`` runs one step on a fixed global batch with N workers (N workers must give the
loss of one), and ``CAPFILT_TRAIN_FAULT=<step>:<rank>:<marker file>`` makes one worker die once, as a crash.

Modules: ``spec`` (config -> a job's ``JobSpec``), ``driver`` (``run_job``: Ray Train's setup, storage, the
result), ``worker`` (one rank's loop), ``data`` (stream, plan, batches), ``losses`` (the shared fine-tune's
losses, frozen parameters), ``checkpoints`` (``state.pt``), ``evaluation`` (the held-out set), ``metrics``,
``logs`` (``metrics.jsonl``, TensorBoard), ``collectives`` and ``faults`` (the test hook).
"""

from __future__ import annotations

from .driver import first_step_losses, run_finetune, run_job, run_pretrain
from .spec import EVAL, METRICS, OBJECTIVES, RAY_DIR, ROLES, JobSpec, TrainError, resolve_job

__all__ = [
    "EVAL",
    "METRICS",
    "OBJECTIVES",
    "RAY_DIR",
    "ROLES",
    "JobSpec",
    "TrainError",
    "first_step_losses",
    "resolve_job",
    "run_finetune",
    "run_job",
    "run_pretrain",
]
