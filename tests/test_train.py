"""End-to-end tests of ``fusedloss.train`` on a tiny ImageFolder generated here (CPU only).

4 classes x 6 training + 2 validation JPEGs of 64x64, resnet18 at 32x32, global
batch 8: an epoch is 3 training steps. Most runs call ``main()`` in-process (no
interpreter start-up); the kill and torchrun tests need real processes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("PIL")
pytest.importorskip("numpy")  # a bare GPU box (gpucheck's pytest-ext) may lack it: a skip, not an error

import numpy as np  # noqa: E402

from fusedloss import LOSSES  # noqa: E402
from fusedloss.train import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat", "dog")
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--progress", "none"]
# One BLAS/OpenMP thread per process: on a shared 2-core machine, spinning
# OpenMP threads that compete for a core make each step ~40x slower.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
TIMING_KEYS = {"train_img_s", "train_seconds", "val_seconds", "time"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_image_folder(root: Path, classes: tuple[str, ...], per_class: dict[str, int]) -> Path:
    """JPEGs whose mean color depends on the class, so the classes are learnable."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 64, (64, 64, 3)) + 48 * k
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny"), CLASSES, {"train": 6, "val": 2})


@pytest.fixture(scope="module")
def ce_run(tiny_data, tmp_path_factory) -> Path:
    """A 2-epoch ce run, shared by the resume, plot and mismatch tests."""
    out = tmp_path_factory.mktemp("ce_run")
    assert main(["--data", str(tiny_data), *TINY, "--epochs", "2", "--output", str(out)]) == 0
    return out


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


@pytest.mark.parametrize("loss", LOSSES)
def test_one_epoch_every_loss(loss, tiny_data, tmp_path):
    assert main(["--data", str(tiny_data), *TINY, "--epochs", "1", "--loss", loss, "--output", str(tmp_path)]) == 0
    (record,) = read_log(tmp_path)
    assert record["epoch"] == 1 and record["loss"] == loss
    assert record["train_images"] == 24 and record["val_images"] == 8  # 3 steps of 8; every val image once
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["val_nll"])
    ckpt = load(tmp_path / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["loss"] == loss and ckpt["classes"] == list(CLASSES)
    assert (tmp_path / "best.pt").is_file()
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]  # atomic writes leave no temp files


def test_resume_continues_exactly(ce_run, tiny_data, tmp_path):
    """1 epoch, stop, --resume to 2 epochs == 2 epochs straight: metrics, weights, momentum, scheduler."""
    args = ["--data", str(tiny_data), *TINY, "--output", str(tmp_path)]
    assert main([*args, "--epochs", "1"]) == 0
    first = load(tmp_path / "checkpoint.pt")
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    resumed, straight = load(tmp_path / "checkpoint.pt"), load(ce_run / "checkpoint.pt")

    assert [r["epoch"] for r in read_log(tmp_path)] == [1, 2]
    assert resumed["epoch"] == 2 and resumed["scheduler"]["last_epoch"] == 2
    assert without_timing(resumed["history"][0]) == without_timing(first["history"][0])  # history kept
    assert [without_timing(r) for r in resumed["history"]] == [without_timing(r) for r in straight["history"]]
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)
    for key, state in straight["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=0, atol=0)
    # Resuming a finished run does nothing and says so.
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    assert len(read_log(tmp_path)) == 2


def test_killed_run_resumes_exactly_with_workers(tiny_data, tmp_path):
    """SIGKILL the script (run as the bench wrapper) in its second epoch, --resume to the third: the log and
    the weights equal a straight 3-epoch run's, bit for bit, with --workers 2 (persistent validation workers,
    fresh training workers each epoch) and mixup (the global torch RNG drawn in the main process)."""
    args = [*TINY, "--workers", "2", "--mixup-alpha", "0.4", "--epochs", "3"]  # the later --workers wins
    run = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "bench" / "imagenet" / "train.py"), "--data", str(tiny_data), *args,
           "--output", str(run)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log, deadline = run / "log.jsonl", time.monotonic() + 120
    try:
        while not (log.is_file() and log.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no epoch finished in 120 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    killed = load(run / "checkpoint.pt")  # complete, whatever moment the kill hit
    done = killed["epoch"]
    assert 1 <= done < 3

    assert main(["--data", str(tiny_data), *args, "--output", str(run), "--resume", str(run / "checkpoint.pt")]) == 0
    assert main(["--data", str(tiny_data), *args, "--output", str(tmp_path / "straight")]) == 0
    final, straight = load(run / "checkpoint.pt"), load(tmp_path / "straight" / "checkpoint.pt")
    assert final["epoch"] == 3 and final["scheduler"]["last_epoch"] == 3
    assert [r["epoch"] for r in read_log(run)] == [1, 2, 3]
    assert final["history"][:done] == killed["history"]
    assert [without_timing(r) for r in read_log(run)] == [without_timing(r) for r in read_log(tmp_path / "straight")]
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=0, atol=0, msg=name)
    for key, state in straight["optimizer"]["state"].items():
        torch.testing.assert_close(final["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=0, atol=0)
    # Every rank's checkpoint holds its loaders' own generators (restored on resume).
    assert set(final["rng"][0]["loaders"]) == {"train", "val"}


def test_torchrun_two_processes(tiny_data, tmp_path):
    """DDP over gloo: each process takes half of the global batch; every val image is counted once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fusedloss.train", "--data", str(tiny_data), *TINY, "--epochs", "1", "--output", str(tmp_path)]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu, batch 8 (4 per process)" in result.stdout
    (record,) = read_log(tmp_path)
    assert record["train_images"] == 24 and record["val_images"] == 8
    ckpt = load(tmp_path / "checkpoint.pt")
    assert len(ckpt["rng"]) == 2  # one random state per rank, for an exact resume


def test_dummy_data(tmp_path):
    args = ["--dummy", "--num-classes", "10", "--dummy-train-size", "16", "--dummy-val-size", "8", *TINY,
            "--epochs", "1", "--loss", "focal", "--output", str(tmp_path)]
    assert main(args) == 0
    (record,) = read_log(tmp_path)
    assert record["train_images"] == 16 and record["val_images"] == 8
    assert load(tmp_path / "checkpoint.pt")["num_classes"] == 10


def test_matplotlib_is_imported_only_for_plot(tmp_path):
    """``python -m fusedloss.train --help`` and a training run without --plot do not import matplotlib
    (seconds of start-up, and a display back end on some machines); --plot does (test_plot_several_runs)."""
    train = ["--dummy", "--num-classes", "4", "--dummy-train-size", "8", "--dummy-val-size", "8", *TINY,
             "--epochs", "1", "--output", str(tmp_path / "run")]
    code = "\n".join([
        "import runpy, sys",
        "sys.argv = ['fusedloss.train', '--help']",
        "try:",
        "    runpy.run_module('fusedloss.train', run_name='__main__', alter_sys=True)",
        "except SystemExit as e:",
        "    assert e.code == 0, e.code",
        "assert 'matplotlib' not in sys.modules, 'imported by --help'",
        "from fusedloss.train import main",
        f"assert main({train!r}) == 0",
        "assert 'matplotlib' not in sys.modules, 'imported by a training run'",
        "print('ok')"])
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_plot_several_runs(ce_run, tmp_path):
    out = tmp_path / "curves.png"
    assert main(["--plot", str(ce_run), str(ce_run / "log.jsonl"), "--plot-out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _folder_without(tmp: Path, split: str) -> Path:
    make_image_folder(tmp / "d", CLASSES, {"train": 1, "val": 1})
    for name in CLASSES:
        for f in (tmp / "d" / split / name).iterdir():
            f.unlink()
        (tmp / "d" / split / name).rmdir()
    return tmp / "d"


def _empty_class(tmp: Path) -> Path:
    make_image_folder(tmp / "d", CLASSES, {"train": 1, "val": 1})
    (tmp / "d" / "val" / "ant" / "0.jpg").unlink()
    return tmp / "d"


def _other_classes(tmp: Path) -> Path:
    make_image_folder(tmp / "d", CLASSES, {"train": 1, "val": 1})
    (tmp / "d" / "val" / "cat").rename(tmp / "d" / "val" / "cow")
    return tmp / "d"


BAD_DATA = {
    "missing folder": (lambda tmp: tmp / "nowhere", "no such directory"),
    "no val split": (lambda tmp: (make_image_folder(tmp / "d", CLASSES, {"train": 1}), tmp / "d")[1], "no val/ folder"),
    "no class folders": (lambda tmp: _folder_without(tmp, "train"), "train/ has no class sub-folders"),
    "class without images": (_empty_class, "Found no valid file"),
    "train and val differ": (_other_classes, "different classes"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_folder(case, tmp_path, capsys):
    make, message = BAD_DATA[case]
    rc = main(["--data", str(make(tmp_path)), *TINY, "--epochs", "1", "--output", str(tmp_path / "out")])
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet51"], "not a torchvision classification model; did you mean resnet50"),
    (["--loss", "crl", "--gamma", "-1"], "gamma"),
    (["--dummy"], "exactly one of --data DIR and --dummy"),
])
def test_bad_names(args, message, tiny_data, tmp_path, capsys):
    # --epochs 1: should a case ever pass the checks, it costs one epoch, not the default 90.
    assert main(["--data", str(tiny_data), *TINY, "--epochs", "1", *args, "--output", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_unknown_loss_is_a_usage_error(tiny_data, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices: exit status 2 and the valid names
        main(["--data", str(tiny_data), "--loss", "hinge"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'hinge'" in capsys.readouterr().err


def test_class_count_mismatch_with_checkpoint(ce_run, tmp_path, capsys):
    three = make_image_folder(tmp_path / "three", CLASSES[:3], {"train": 4, "val": 1})
    rc = main(["--data", str(three), *TINY, "--epochs", "3", "--output", str(tmp_path / "out"),
               "--resume", str(ce_run / "checkpoint.pt")])
    assert rc == 2
    assert "class count mismatch: the checkpoint's model has 4 classes, the data has 3" in capsys.readouterr().err


def test_bad_checkpoint_and_existing_run(ce_run, tiny_data, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["--data", str(tiny_data), *TINY, "--output", str(tmp_path / "o"), "--resume", str(garbage)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    # Starting without --resume into a directory that holds a run would overwrite it: refused.
    assert main(["--data", str(tiny_data), *TINY, "--output", str(ce_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("loss", LOSSES)
def test_dummy_on_gpu_bf16_channels_last(loss, tmp_path):
    """The throughput configuration (bf16 autocast, channels-last, synthetic data) on one GPU, every loss."""
    if not torch.cuda.is_available():  # checked here, not at import: test modules must not touch the GPU
        pytest.skip("needs CUDA")
    args = ["--dummy", "--device", "cuda", "--amp", "bf16", "--channels-last", "--num-classes", "1000",
            "--dummy-train-size", "256", "--dummy-val-size", "64", "--arch", "resnet18", "--image-size", "64",
            "--batch-size", "64", "--workers", "0", "--progress", "none", "--epochs", "1", "--loss", loss,
            "--output", str(tmp_path)]
    assert main(args) == 0
    (record,) = read_log(tmp_path)
    assert record["train_images"] == 256 and np.isfinite(record["train_loss"])
    assert load(tmp_path / "checkpoint.pt")["rng"][0]["cuda"] is not None
