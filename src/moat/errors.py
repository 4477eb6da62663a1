"""The `moat` command's error boundary: what the user sees when a command fails.

Exit codes:

    0    success
    1    `moat predict`, `moat explain`: some images could not be read or explained (the
         others were)
    2    an expected failure: bad input or data, a damaged file, a file system error
         (missing file, permission, read-only folder, full disk), a run folder in use, a
         missing optional package, a diverged run; one or two lines, no traceback
    70   an unexpected exception: a bug; its traceback is printed, marked as such
    130  interrupted by Ctrl-C (SIGINT), 143 by SIGTERM; a training run prints the command
         that resumes it (its last checkpoint is complete: checkpoints are atomic)

Expected failures are the library's own messages (`MoatError`, and ValueError raised by
moat's own code, which always say what was wrong and what to do), OSError, and
ModuleNotFoundError for the optional packages of `moat[full]`. A ValueError raised inside
PyTorch or another library is not ours to explain: it keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

EXIT_ERROR, EXIT_BUG, EXIT_SIGINT, EXIT_SIGTERM = 2, 70, 130, 143

# import name -> the package that provides it, all in the `full` extra (pyproject.toml)
OPTIONAL_PACKAGES = {"torchvision": "torchvision", "timm": "timm", "PIL": "pillow",
                     "yaml": "pyyaml", "tensorboard": "tensorboard",
                     "matplotlib": "matplotlib", "onnx": "onnx", "onnxscript": "onnxscript",
                     "onnxruntime": "onnxruntime", "pycocotools": "pycocotools",
                     "executorch": "executorch", "huggingface_hub": "huggingface_hub",
                     "captum": "captum", "gradio": "gradio", "webdataset": "webdataset",
                     "wids": "wids", "braceexpand": "webdataset", "datasets": "datasets"}

_PACKAGE_DIR = str(Path(__file__).resolve().parent)


class MoatError(Exception):
    """An expected failure whose message tells the user what was wrong and what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that `finally` blocks and atomic writes clean up."""


def run_command(func: Callable[[], int], command: str, resume_hint: str | None = None) -> int:
    """Run `func` (one subcommand) inside the boundary; return the exit code."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (e.g. called from a test thread)
        previous = None
    try:
        return func()
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        how = "stopped by SIGTERM" if terminated else "interrupted (Ctrl-C)"
        _say(command, how + (f"; the last complete checkpoint is kept, continue with:\n  "
                             f"{resume_hint}" if resume_hint else ""))
        return EXIT_SIGTERM if terminated else EXIT_SIGINT
    except Exception as err:  # noqa: BLE001 - this is the boundary: sorted just below
        message = expected_message(err)
        if message is None:
            traceback.print_exc()
            _say(command, f"internal error ({type(err).__name__}): this is a bug in moat; "
                 "please report it with the traceback above and the command you ran")
            return EXIT_BUG
        _say(command, "error: " + message)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def expected_message(err: BaseException) -> str | None:
    """The user-facing text of an expected failure, or None for a bug."""
    if isinstance(err, MoatError):
        return str(err)
    if isinstance(err, ModuleNotFoundError):
        top = (err.name or "").split(".")[0]
        if top in OPTIONAL_PACKAGES:
            return (f"this needs the optional package {OPTIONAL_PACKAGES[top]!r}, which is not "
                    "installed; install the full set with: pip install 'moat[full]'")
        return None
    if isinstance(err, OSError):
        return _os_message(err)
    if type(err).__name__ == "SafetensorError":  # a reader we did not wrap
        return f"a weights file is damaged or not a safetensors file ({err})"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return ("out of memory; lower --batch-size (or raise --accum-steps), use "
                "--grad-checkpointing or --precision bf16")
    if isinstance(err, ValueError) and _raised_by_moat(err):
        return str(err)
    if isinstance(err, KeyError) and _raised_by_moat(err) and " " in str(err.args[0]):
        return str(err.args[0])  # a sentence raised on purpose, not a bare missing key
    return None


def _os_message(err: OSError) -> str:
    if err.filename is None or err.strerror is None:
        text = str(err)  # our own message (e.g. "checkpoint 'x' does not exist")
    else:
        text = f"{err.strerror}: {err.filename}"
    if err.errno == errno.ENOSPC:
        return (text + "; free some space on that disk (or write elsewhere); files are "
                "written atomically, so nothing complete was overwritten")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return text + "; choose a folder you can write to, or fix its permissions"
    return text


def _raised_by_moat(err: BaseException) -> bool:
    """Whether the innermost frame of the traceback is moat's own code."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _say(command: str, text: str) -> None:
    print(f"moat {command}: {text}", file=sys.stderr, flush=True)
