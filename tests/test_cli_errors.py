"""The CLI's error boundary (moat/errors.py): every subcommand's expected failures are one or two
lines and exit 2, a bug keeps its traceback (exit 70), Ctrl-C says how to resume (130);
reports and exports never leave invalid files or need a writable checkpoint folder."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from filesystems import read_only, small_filesystem

import moat
from moat.cli import main as cli
from moat.errors import EXIT_BUG, EXIT_ERROR, EXIT_SIGINT, expected_message, run_command
from moat.train.config import TrainConfig
from moat.weights import WeightsMetadata, save_weights

TINY = ["--model", "tiny_moat_0", "--img-size", "32", "--batch-size", "4", "--lr", "1e-3",
        "--workers", "0", "--no-progress", "--no-tensorboard", "--epochs", "1"]


@pytest.fixture(scope="module")
def data(shapes3) -> Path:
    return shapes3


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights file as `moat.weights.save_weights` writes it (variant in the header)."""
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    model = moat.create_model("tiny_moat_0", num_classes=3)
    return save_weights(path, model.state_dict(), WeightsMetadata(
        variant="tiny_moat_0", position_embedding=True, num_classes=3))


def _fails(capsys, argv: list[str], *needles: str) -> str:
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == EXIT_ERROR, err
    assert "Traceback" not in err, err
    message = err[err.index(f"moat {argv[0]}: error: "):]  # after any warnings logged
    assert len(message.strip().splitlines()) <= 2, err
    for needle in needles:
        assert needle in err, err
    return err


def test_models_summary_convert_info_errors(capsys, tmp_path):
    _fails(capsys, ["summary", "moat_9"], "unknown model 'moat_9'")
    _fails(capsys, ["convert", str(tmp_path / "nothing"), str(tmp_path / "o.safetensors")],
           "no TensorFlow checkpoint")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    _fails(capsys, ["info", str(bad)], "bad.safetensors", "not a readable safetensors")


def test_train_errors(capsys, data, tmp_path):
    _fails(capsys, ["train", "--data", str(tmp_path / "none"), "--output",
                    str(tmp_path / "r"), *TINY], "does not exist")
    _fails(capsys, ["train", "--data", str(data), *TINY], "--output")
    _fails(capsys, ["train", "--data", str(data), "--output", str(tmp_path / "r"), *TINY,
                    "--set", "epohcs=3"], "did you mean epochs")
    (tmp_path / "one" / "train" / "cat").mkdir(parents=True)
    shutil.copy(next((data / "train" / "circle").iterdir()), tmp_path / "one/train/cat/a.png")
    _fails(capsys, ["train", "--data", str(tmp_path / "one"), "--output", str(tmp_path / "r2"),
                    *TINY], "one class", "at least two")
    assert not (tmp_path / "r2" / "checkpoints").exists()  # refused before training


def test_eval_predict_plot_errors(capsys, data, tmp_path, weights):
    _fails(capsys, ["eval", "--data", str(data), "--checkpoint", str(tmp_path / "x")],
           "does not exist")
    _fails(capsys, ["predict", str(data / "val"), "--checkpoint", str(data)],
           "no complete checkpoint")
    _fails(capsys, ["plot", str(data)], "metrics.jsonl")
    empty = tmp_path / "no_images"
    empty.mkdir()
    _fails(capsys, ["predict", str(empty), "--checkpoint", str(weights)], "no images")
    damaged = tmp_path / "damaged.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-2000:-1992] = bytes(b ^ 0xFF for b in raw[-2000:-1992])
    damaged.write_bytes(bytes(raw))
    _fails(capsys, ["predict", str(data / "val"), "--checkpoint", str(damaged)],
           "damaged.safetensors", "differs")


def test_export_error_leaves_no_file(capsys, tmp_path, weights, monkeypatch):
    out = tmp_path / "m.onnx"
    _fails(capsys, ["export", "onnx", str(weights), str(out), "--img-size", "64", "--opset",
                    "99"], "opset 99 is not supported")
    assert list(tmp_path.iterdir()) == []
    # a failure after the exporter wrote its file (here: the onnxruntime check) leaves nothing
    import moat.export.formats as formats

    def failing_check(*args, **kwargs):
        raise RuntimeError("onnxruntime differs (simulated)")

    monkeypatch.setattr(formats, "check_onnx", failing_check)
    assert cli(["export", "onnx", str(weights), str(out), "--img-size", "64"]) == EXIT_BUG
    assert "simulated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    _fails(capsys, ["export", "torchscript", "moat_9", str(out)], "unknown model")


def test_benchmark_unknown_model(capsys):
    _fails(capsys, ["benchmark", "no_such_net", "--repeats", "1", "--no-memory"],
           "unknown model 'no_such_net'")


def test_eval_report_goes_where_the_user_can_write(capsys, data, tmp_path, weights,
                                                   monkeypatch):
    with read_only(tmp_path / "ro", lambda p: shutil.copy(weights, p / "w.safetensors")) as ro:
        monkeypatch.chdir(tmp_path)
        code = cli(["eval", "--data", str(data), "--checkpoint", str(ro / "w.safetensors"),
                    "--workers", "0"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert (tmp_path / "eval-w" / "per_class.csv").is_file()
        assert "writing it to" in captured.err or "eval-w" in captured.out


def test_disk_full_is_one_line_and_leaves_no_partial_checkpoint(capsys, data, tmp_path,
                                                                monkeypatch):
    with small_filesystem(tmp_path / "small", 8, monkeypatch) as small:
        run = small / "run"
        code = cli(["train", "--data", str(data), "--output", str(run), *TINY])
        err = capsys.readouterr().err
        assert code == EXIT_ERROR, err
        assert "No space left on device" in err and "Traceback" not in err
        leftovers = [p.name for p in (run / "checkpoints").iterdir()] \
            if (run / "checkpoints").exists() else []
        assert not [n for n in leftovers if n.startswith((".tmp-", "step-"))]


def test_boundary_sorts_expected_failures_from_bugs(capsys):
    def bug():
        return torch.zeros(2) @ torch.zeros(3)  # a RuntimeError inside PyTorch

    assert run_command(bug, "x") == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "this is a bug in moat" in err

    def interrupted():
        raise KeyboardInterrupt

    assert run_command(interrupted, "train", resume_hint="moat train --resume") == EXIT_SIGINT
    assert "moat train --resume" in capsys.readouterr().err

    missing = ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
    assert "pip install 'moat[full]'" in expected_message(missing)
    assert expected_message(ModuleNotFoundError("x", name="not_ours")) is None
    full = OSError(errno.ENOSPC, "No space left on device", "/x/state.pt")
    assert expected_message(full).startswith("No space left on device: /x/state.pt; free some")
    try:
        int("nope")
    except ValueError as err:  # raised by Python itself, not by moat: a bug
        assert expected_message(err) is None


def test_train_flags_come_from_train_config(capsys):
    import argparse

    from moat.cli.options import add_train_options

    parser = argparse.ArgumentParser()
    add_train_options(parser)
    args = parser.parse_args(["--label-smoothing", "0.2", "--no-ema", "--scale", "0.5", "1",
                              "--betas", "0.9", "0.95", "--ema-decay", "0.99"])
    flags = {k: getattr(args, k) for k in args.train_flags}
    config = TrainConfig.from_dict({k: v for k, v in flags.items() if v is not None})
    assert (config.label_smoothing, config.ema, config.scale, config.betas, config.ema_decay) \
        == (0.2, False, (0.5, 1.0), (0.9, 0.95), 0.99)
    assert "mixup" in args.train_flags and "task_options" not in args.train_flags


def test_missing_optional_package_names_the_extra(capsys, tmp_path, weights, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # as on a base install without moat[full]
    out = tmp_path / "m.onnx"
    _fails(capsys, ["export", "onnx", str(weights), str(out), "--img-size", "64"],
           "optional package 'onnx'", "pip install 'moat[full]'")
    assert not out.exists()


def test_eval_predict_numbers_are_checked_by_the_parser(capsys, data, weights):
    common = ["--checkpoint", str(weights)]
    for argv in (["eval", "--data", str(data), *common, "--batch-size", "0"],
                 ["eval", "--data", str(data), *common, "--workers", "-1"],
                 ["predict", str(data), *common, "--top-k", "0"],
                 ["predict", str(data), *common, "--img-size", "-5"]):
        with pytest.raises(SystemExit) as exit_info:
            cli(argv)
        assert exit_info.value.code == 2 and "must be >=" in capsys.readouterr().err


def test_unwritable_json_names_the_users_path(capsys, data, weights):
    err = _fails(capsys, ["predict", str(data / "val"), "--checkpoint", str(weights), "--json",
                          "/proc/moat-test.json"], "/proc/moat-test.json")
    assert ".tmp-" not in err  # the user's file name, not the temporary one


# --- every number checked where it enters (issue 25) -------------------------------------------

def test_train_numbers_are_refused_before_anything_is_derived(capsys, data, tmp_path):
    """Each one used to reach the recipe (division by zero, "math domain error"), NumPy or
    a transform; now the setting is named, before the recipe or the data are touched."""
    run = tmp_path / "r"
    for flags, needle in ((["--batch-size", "0"], "batch_size must be >= 1, got 0"),
                          (["--epochs", "-1"], "epochs must be >= 1, got -1"),
                          (["--seed", "-1"], "seed must be in 0 .. 2**32-1, got -1"),
                          (["--std", "0", "0", "0"], "std must be three numbers > 0"),
                          (["--warmup-epochs", "inf"], "warmup_epochs must be a finite number"),
                          (["--lr-base", "0"], "lr_base must be > 0"),
                          (["--interpolation", "cubic"], "interpolation 'cubic' is unknown")):
        _fails(capsys, ["train", "--data", str(data), "--output", str(run), *TINY, *flags],
               needle)
        assert not run.exists()


@pytest.mark.parametrize("argv", [
    ["export", "onnx", "tiny_moat_0", "x.onnx", "--img-size", "0"],
    ["export", "onnx", "tiny_moat_0", "x.onnx", "--batch", "0"],
    ["export", "torchscript", "tiny_moat_0", "x.pt", "--pool-size", "0"],
    ["export", "onnx", "tiny_moat_0", "x.onnx", "--window-size", "0", "none", "none", "none"],
    ["summary", "tiny_moat_0", "--img-size", "0"],
    ["summary", "tiny_moat_0", "--pool-size", "-2"],
    ["benchmark", "tiny_moat_0", "--batch-size", "0"],
    ["benchmark", "tiny_moat_0", "--repeats", "0"],
    ["benchmark", "tiny_moat_0", "--img-size", "8"],
    ["benchmark", "tiny_moat_0", "--drop-path-rate", "nan"],
    ["quantize", "a.onnx", "b.onnx", "--calibration", "d", "--max-images", "-1"],
    ["quantize", "a.onnx", "b.onnx", "--calibration", "d", "--max-images", "0"],
    ["explain", "x.png", "--model", "tiny_moat_0", "--output-dir", "o", "--box", "-1"],
    ["app", "--model", "tiny_moat_0", "--port", "0"],
    ["app", "--model", "tiny_moat_0", "--max-upload-mb", "0"],
    ["demo", "--epochs", "0"],
])
def test_command_numbers_are_checked_by_the_parser(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    err = capsys.readouterr().err
    flag = next(a for a in reversed(argv) if a.startswith("--"))
    assert exit_info.value.code == 2 and f"argument {flag}" in err, err
    assert "must be" in err or "expected" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_message(capsys, data, tmp_path, weights):
    _fails(capsys, ["train", "--data", str(data), "--output", str(tmp_path / "r"), *TINY,
                    "--device", "cuda"], "--device 'cuda'", "CUDA is not available")
    _fails(capsys, ["predict", str(data / "val"), "--checkpoint", str(weights), "--device",
                    "cuda:1"], "--device 'cuda:1'", "--device cpu")
    _fails(capsys, ["predict", str(data / "val"), "--checkpoint", str(weights), "--device",
                    "gpu"], "--device 'gpu' is not a device name")
    _fails(capsys, ["benchmark", "tiny_moat_0", "--device", "cuda", "--repeats", "1"],
           "--device 'cuda'", "CUDA is not available")


def test_every_refusal_is_a_moat_error():
    """The boundary sorts by class alone (no traceback inspection): a ValueError raised
    anywhere, even by moat's own code, is a bug; moat's refusals are MoatErrors."""
    import inspect
    import re

    import moat.errors
    from moat.data.images import BadImageError
    from moat.errors import InvalidInputError, MoatError, NotFoundError
    from moat.explain.explainer import NoDetectionError
    from moat.weights.tf_format import CheckpointError

    assert "__traceback__" not in inspect.getsource(moat.errors)
    for cls in (BadImageError, CheckpointError, NoDetectionError, InvalidInputError):
        assert issubclass(cls, MoatError) and issubclass(cls, ValueError)
    assert expected_message(InvalidInputError("--batch must be >= 1")) == "--batch must be >= 1"
    assert expected_message(NotFoundError("'x' is not in checkpoint y")) == \
        "'x' is not in checkpoint y"
    assert expected_message(ValueError("raised by anyone")) is None
    assert expected_message(KeyError("a sentence with spaces")) is None
    # and no plain ValueError / KeyError is raised by moat's sources any more
    src = Path(moat.__file__).parent
    plain = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"raise (ValueError|KeyError)\(", line)]
    assert not plain, plain


def test_interrupted_run_without_checkpoint_has_no_resume_hint(capsys, data, tmp_path,
                                                                monkeypatch):
    import moat.train.loop as loop

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the run is being assembled

    monkeypatch.setattr(loop, "assemble", stopped)
    code = cli(["train", "--data", str(data), "--output", str(tmp_path / "r"), *TINY])
    err = capsys.readouterr().err
    assert code == EXIT_SIGINT
    assert "no checkpoint was saved yet" in err and "--resume" not in err, err


def test_app_busy_port_suggests_the_flag(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = _fails(capsys, ["app", "--model", "tiny_moat_0", "--port", str(port)],
                     f"port {port} on 127.0.0.1 is already in use", "--port")
    assert "GRADIO_SERVER_PORT" not in err


# --- paths: checked to be a regular file or folder before they are opened -------------------

@pytest.fixture
def fifo(tmp_path):
    """A FIFO; opening it for reading would block forever. The alarm turns a hang into a
    failure instead of a stuck test run."""
    import os
    import signal

    def hung(signum, frame):
        raise AssertionError("a FIFO was opened: the command hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield lambda name: (os.mkfifo(tmp_path / name), tmp_path / name)[1]
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fifos_are_refused_not_opened(capsys, data, tmp_path, fifo):
    out = ["--output", str(tmp_path / "r"), *TINY]
    _fails(capsys, ["train", "--data", str(fifo("train.csv")), *out],
           "CSV file list", "is a FIFO (named pipe), not a regular file")
    _fails(capsys, ["train", "--data", str(data / "train"), "--val-data",
                    str(fifo("val.csv")), *out], "val.csv", "FIFO")
    _fails(capsys, ["train", "--config", str(fifo("c.yaml")), "--data", str(data), *out],
           "config file", "c.yaml", "is a FIFO (named pipe), not a regular file")
    _fails(capsys, ["train", "--data", str(fifo("folder")), *out], "image folder", "FIFO")
    _fails(capsys, ["predict", str(data / "val"), "--checkpoint", str(fifo("w.safetensors"))],
           "w.safetensors", "FIFO")
    _fails(capsys, ["info", str(fifo("i.safetensors"))], "i.safetensors", "FIFO")
    assert not (tmp_path / "r").exists()


def test_a_folder_given_as_config_says_so(capsys, data, tmp_path):
    _fails(capsys, ["train", "--config", str(tmp_path), "--data", str(data), "--output",
                    str(tmp_path / "r"), *TINY], "is a folder, not a regular file")
