"""A run's files for people and tools: ``runs/NAME/`` itself (numbered when taken),
``config.yaml``, ``metrics.jsonl`` (one JSON object per validation or epoch), ``results.png`` (the
curves, redrawn at each validation: :mod:`.curves`) and, with
``log.tensorboard``, TensorBoard event files in ``tensorboard/`` (``torch.utils.tensorboard``,
from the optional ``tensorboard`` package: ``pip install "capcli[tensorboard]"``).

A resumed run continues these files from its checkpoint: records past the checkpoint's step (a
run killed between a record and its checkpoint) and torn lines go. A fresh run in a reused dir
starts them empty.
"""

from __future__ import annotations

from pathlib import Path

from capcli.config import Config, save_config
from capcli.errors import UserError, disk_space
from capcli.store.files import JsonlLog, atomic_path, read_jsonl
from capcli.training.curves import draw_curves

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "results.png"
TENSORBOARD_DIR = "tensorboard"
# metrics.jsonl keys -> TensorBoard tags
TB_TAGS = {"train_loss": "train/loss", "train_top5": "train/top5", "val_loss": "val/loss", "val_top5": "val/top5",
           "val_bleu4": "val/bleu4", "val_cider": "val/cider", "lr": "lr/decoder", "encoder_lr": "lr/encoder",
           "tf_ratio": "train/tf_ratio", "samples_per_s": "train/samples_per_s"}
INSTALL_TENSORBOARD = 'pip install "capcli[tensorboard]"'


def new_run_dir(cfg: Config) -> Path:
    """runs/NAME, or runs/NAME-2, -3 ... when taken (unless run.overwrite)."""
    base = Path(cfg.run.dir) / cfg.run.name
    if cfg.run.overwrite or not base.exists():
        return base
    n = 2
    while (base.parent / f"{base.name}-{n}").exists():
        n += 1
    return base.parent / f"{base.name}-{n}"


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line UserError naming the install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises ImportError when the tensorboard package is missing
        raise UserError(f"log.tensorboard=true needs the tensorboard package: {INSTALL_TENSORBOARD} "
                        "(or set log.tensorboard=false)") from exc
    return SummaryWriter


class RunLog:
    """``metrics.jsonl`` and the TensorBoard events of the run in ``run_dir`` (rank 0 writes them)."""

    def __init__(self, run_dir: Path, cfg: Config, *, resumed_step: int | None = None):
        """Open the run's files: continued from ``resumed_step`` (a resumed run), else empty."""
        self.run_dir = run_dir
        self.path = run_dir / METRICS_FILE
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        self.records: list[dict] = []
        if resumed_step is not None:
            self.records = read_jsonl(self.path, until=lambda record: record.get("step", 0) > resumed_step)
            for tmp in (run_dir / "checkpoints").glob(".*.tmp*"):  # checkpoint writes a kill interrupted
                tmp.unlink(missing_ok=True)
        else:  # appended to, the old files would mix two runs
            self.path.unlink(missing_ok=True)
            (run_dir / CURVES_FILE).unlink(missing_ok=True)
            for old in (*(run_dir / "checkpoints").glob("*.pt"), *(run_dir / "checkpoints").glob(".*.tmp*"),
                        *(run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*")):
                old.unlink(missing_ok=True)
        self._log = JsonlLog(self.path)
        self._tb = summary_writer_class()(str(run_dir / TENSORBOARD_DIR)) if cfg.log.tensorboard else None

    def append(self, record: dict) -> None:
        """One record: a line of metrics.jsonl, its scalars in TensorBoard at its step, and (a
        validation) the curves redrawn."""
        then = "the run's last checkpoint is intact: free some space, then `capcli train --resume RUN` continues it"
        with disk_space(self.path, 4096, then):
            self._log.append([record])
        self.records.append(record)
        if "val_bleu4" in record:
            with disk_space(self.run_dir / CURVES_FILE, 200_000, then), atomic_path(self.run_dir / CURVES_FILE) as tmp:
                draw_curves(self.records, tmp)
        if self._tb is not None:
            for key, tag in TB_TAGS.items():
                value = record.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(tag, float(value), record["step"])
            self._tb.flush()

    def close(self) -> None:
        self._log.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
