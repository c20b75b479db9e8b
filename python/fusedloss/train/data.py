"""Data for ``fusedloss.train``: an ImageFolder tree with the reference transforms, or synthetic batches.

Every loader here hands out the same number of batches on every rank, because
DistributedDataParallel needs all ranks to run the same number of steps.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

# The normalization every torchvision ImageNet checkpoint was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPLITS = ("train", "val")


class TrainInputError(Exception):
    """Bad user input (data folder, checkpoint, model or loss name): printed as one line, exit status 2."""


@dataclass
class Loaders:
    """What the training loop needs from the data: two iterables of (images, targets) and the class names."""

    train: DataLoader | SyntheticBatches
    val: DataLoader | SyntheticBatches
    classes: list[str]
    train_sampler: DistributedSampler | None  # needs set_epoch() each epoch; None for synthetic data
    generator: torch.Generator | None  # the training loader's; re-seeded each epoch, see seed_epoch()
    val_generator: torch.Generator | None = None  # the validation loader's; re-seeded each epoch

    def seed_epoch(self, seed: int, epoch: int, rank: int) -> None:
        """Make the epoch's sample order and augmentation seeds a function of (seed, epoch, rank) only.

        The order comes from DistributedSampler(seed, epoch); each DataLoader draws its
        workers' base seed from its own generator when an iterator starts (a DataLoader
        without one draws it from the global torch RNG, which the persistent validation
        workers would then advance once per process: once in a straight run, once more in
        a resumed one). Seeding both per epoch means a resumed run reads exactly the
        batches, and continues the global random streams, of the uninterrupted run.
        """
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch)
        for stream, gen in enumerate((self.generator, self.val_generator)):
            if gen is not None:
                streams = [seed, epoch, rank] + ([stream] if stream else [])
                gen.manual_seed(int(np.random.SeedSequence(streams).generate_state(1)[0]))

    def generators(self) -> dict[str, torch.Generator]:
        """The loaders' own generators by name, for the checkpoint (ckpt.capture_rng / restore_rng)."""
        return {name: gen for name, gen in (("train", self.generator), ("val", self.val_generator))
                if gen is not None}


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``W`` reads indices ``r, r + W, r + 2W, ...``: every sample exactly once over all ranks.

    Used for validation instead of DistributedSampler, which pads the last shard
    with repeated samples and so biases the reported accuracy. Evaluation runs on
    the unwrapped model (no collectives per step), so uneven shard lengths are fine.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SyntheticBatches:
    """``steps`` batches of one fixed random image tensor already on the device, with random labels.

    Like ``--dummy`` in pytorch/examples' ``imagenet/main.py``, but without the
    host-side pipeline (no PIL, no copies): the images/s it reports measure the
    model, the loss and the optimizer, which is what a throughput comparison of
    losses needs. Accuracy on it is chance level by construction.
    """

    def __init__(self, steps: int, batch_size: int, num_classes: int, image_size: int,
                 device: torch.device, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.steps = steps
        self.images = torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(device)
        # A handful of label vectors cycled over the steps: enough to keep the loss varied.
        self.targets = torch.randint(0, num_classes, (8, batch_size), generator=gen).to(device)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self.steps):
            yield self.images, self.targets[step % len(self.targets)]


def list_classes(root: str) -> list[str]:
    """Class names of one split, the way ImageFolder finds them: its sub-directories, sorted."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def check_image_folder(data: str) -> list[str]:
    """Check ``data`` has ``train/`` and ``val/`` with the same non-empty class folders; return the classes.

    Raises TrainInputError with a message that says what is wrong and what is expected.
    """
    layout = "expected the ImageFolder layout DIR/train/<class>/<image> and DIR/val/<class>/<image>"
    if not os.path.isdir(data):
        raise TrainInputError(f"--data {data!r}: no such directory ({layout})")
    classes: dict[str, list[str]] = {}
    for split in SPLITS:
        root = os.path.join(data, split)
        if not os.path.isdir(root):
            raise TrainInputError(f"--data {data!r}: no {split}/ folder ({layout})")
        classes[split] = list_classes(root)
        if not classes[split]:
            raise TrainInputError(f"--data {data!r}: {split}/ has no class sub-folders ({layout})")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise TrainInputError(
            f"--data {data!r}: train/ and val/ have different classes "
            f"(only in train/: {only_train[:5]}, only in val/: {only_val[:5]})")
    return classes["train"]


@dataclass(frozen=True)
class Augment:
    """The image pipeline's settings, named after torchvision's reference flags."""

    train_crop_size: int = 224
    val_resize_size: int = 256
    val_crop_size: int = 224
    interpolation: str = "bilinear"
    auto_augment: str | None = None  # ra, ta_wide, augmix, or an AutoAugmentPolicy (imagenet, cifar10, svhn)
    random_erase: float = 0.0
    ra_magnitude: int = 9
    augmix_severity: int = 3


def image_transforms(aug: Augment) -> tuple[object, object]:
    """torchvision's ClassificationPresetTrain / ClassificationPresetEval (PIL backend, v1 transforms).

    Training: random-resized crop, horizontal flip, the auto-augment policy if any, to tensor,
    normalize, random erasing if any. Validation: resize, center crop, to tensor, normalize.
    """
    from torchvision import transforms as T

    interpolation = T.InterpolationMode(aug.interpolation)
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = [T.RandomResizedCrop(aug.train_crop_size, interpolation=interpolation), T.RandomHorizontalFlip()]
    if aug.auto_augment == "ra":
        train.append(T.RandAugment(interpolation=interpolation, magnitude=aug.ra_magnitude))
    elif aug.auto_augment == "ta_wide":
        train.append(T.TrivialAugmentWide(interpolation=interpolation))
    elif aug.auto_augment == "augmix":
        train.append(T.AugMix(interpolation=interpolation, severity=aug.augmix_severity))
    elif aug.auto_augment is not None:
        train.append(T.AutoAugment(T.AutoAugmentPolicy(aug.auto_augment), interpolation=interpolation))
    train += [T.ToTensor(), normalize]
    if aug.random_erase > 0:
        train.append(T.RandomErasing(p=aug.random_erase))
    val = [T.Resize(aug.val_resize_size, interpolation=interpolation), T.CenterCrop(aug.val_crop_size),
           T.ToTensor(), normalize]
    return T.Compose(train), T.Compose(val)


def image_folder_loaders(data: str, batch_size: int, workers: int, aug: Augment,
                         rank: int, world_size: int, seed: int, pin_memory: bool) -> Loaders:
    """Loaders over ``data/train`` and ``data/val``; ``batch_size`` is per process."""
    from torchvision.datasets import ImageFolder

    classes = check_image_folder(data)
    train_tf, val_tf = image_transforms(aug)
    datasets: dict[str, Dataset] = {}
    for split, tf in (("train", train_tf), ("val", val_tf)):
        try:
            datasets[split] = ImageFolder(os.path.join(data, split), transform=tf)
        except FileNotFoundError as err:  # a class folder without a single image file
            raise TrainInputError(f"--data {data!r}: {split}/: {err}") from None
    train_set, val_set = datasets["train"], datasets["val"]
    if len(train_set) < batch_size * world_size:
        raise TrainInputError(
            f"--data {data!r}: train/ has {len(train_set)} images, fewer than one global batch "
            f"({batch_size} x {world_size} processes); lower --batch-size")

    # DistributedSampler also serves the single process (num_replicas=1): the order is
    # then a function of (seed, epoch) alone, with or without torchrun.
    train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    generator = torch.Generator()
    # Training workers are NOT persistent: fresh workers each epoch take their seeds from
    # `generator`, re-seeded per epoch, so a resumed run replays the same augmentations
    # (persistent workers would carry RNG state across epochs that no checkpoint holds).
    # Starting them costs seconds per epoch. Validation has no randomness: its workers persist,
    # with a generator of their own all the same (see Loaders.seed_epoch).
    train = DataLoader(train_set, batch_size=batch_size, sampler=train_sampler, num_workers=workers,
                       pin_memory=pin_memory, drop_last=True,  # a batch of 1 breaks BatchNorm at 1x1 maps
                       generator=generator, persistent_workers=False)
    val_generator = torch.Generator()
    val = DataLoader(val_set, batch_size=batch_size, sampler=ShardSampler(len(val_set), rank, world_size),
                     num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                     generator=val_generator)
    return Loaders(train, val, classes, train_sampler, generator, val_generator)


def synthetic_loaders(train_size: int, val_size: int, num_classes: int, batch_size: int, train_crop_size: int,
                      val_crop_size: int, world_size: int, device: torch.device, seed: int, rank: int) -> Loaders:
    """Synthetic data of ImageNet's shapes; sizes are global sample counts, split evenly over the ranks.

    The images are tensors already: the per-image augmentations do not apply (mixup/cutmix do).
    """
    global_batch = batch_size * world_size
    train_steps = max(1, train_size // global_batch)
    val_steps = max(1, math.ceil(val_size / global_batch))
    classes = [f"class{k:04d}" for k in range(num_classes)]
    return Loaders(
        SyntheticBatches(train_steps, batch_size, num_classes, train_crop_size, device, seed + rank),
        SyntheticBatches(val_steps, batch_size, num_classes, val_crop_size, device, seed + rank + 10_000),
        classes, None, None)
