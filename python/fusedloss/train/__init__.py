"""``python -m fusedloss.train``: train a torchvision classifier with any fusedloss loss (docs/training.md).

Modules: ``cli`` (the flags and the run), ``recipe`` (named recipes, mixup/cutmix and the loss routing,
EMA, LR schedules), ``data`` (an ImageFolder tree or synthetic batches), ``loop`` (an epoch, the
evaluation), ``dist`` (the process group), ``ckpt`` (checkpoints, resume), ``plot`` (the per-epoch log
and its curves), ``distill`` (``--teacher``: knowledge distillation).
"""
from fusedloss.train.cli import build_parser, main, make_criterion

__all__ = ["build_parser", "main", "make_criterion"]
