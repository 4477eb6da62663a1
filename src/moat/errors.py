"""The `moat` command's error boundary: what the user sees when a command fails.

Exit codes:

    0    success
    1    `moat predict`, `moat explain`: some images could not be read or explained (the
         others were)
    2    an expected failure: bad input or data, a damaged file, a file system error
         (missing file, permission, read-only folder, full disk), a run folder in use, a
         missing optional package, a diverged run; one or two lines, no traceback
    70   an unexpected exception: a bug; its traceback is printed, marked as such
    130  interrupted by Ctrl-C (SIGINT), 143 by SIGTERM; a training run says what it left: the
         command that resumes it when it has a checkpoint (complete: checkpoints are
         atomic), or that it saved none yet

Expected failures are the library's own messages (`MoatError` and its subclasses, which
always say what was wrong and what to do), OSError, and ModuleNotFoundError for the optional
packages of `moat[full]`. The boundary decides by the exception's class alone, never by where
it was raised: every refusal moat makes is a MoatError, so a ValueError (or any other
exception) that is not one is a bug, in moat or in a library it calls, and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import traceback
from collections.abc import Callable, Iterator

EXIT_ERROR, EXIT_BUG, EXIT_SIGINT, EXIT_SIGTERM = 2, 70, 130, 143

# import name -> the package that provides it, all in the `full` extra (pyproject.toml)
OPTIONAL_PACKAGES = {"torchvision": "torchvision", "timm": "timm", "PIL": "pillow",
                     "yaml": "pyyaml", "tensorboard": "tensorboard",
                     "matplotlib": "matplotlib", "onnx": "onnx", "onnxscript": "onnxscript",
                     "onnxruntime": "onnxruntime", "pycocotools": "pycocotools",
                     "executorch": "executorch", "huggingface_hub": "huggingface_hub",
                     "captum": "captum", "gradio": "gradio", "webdataset": "webdataset",
                     "wids": "wids", "braceexpand": "webdataset", "datasets": "datasets"}

class MoatError(Exception):
    """An expected failure whose message tells the user what was wrong and what to do."""


class InvalidInputError(MoatError, ValueError):
    """A value, setting, argument or file content that moat refuses (also a ValueError, so
    library callers that catch ValueError keep working)."""


class NotFoundError(MoatError, KeyError):
    """A name that is not there (a tensor in a checkpoint, a class, ...); its message is a
    sentence, printed as is (a plain KeyError would print its repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that `finally` blocks and atomic writes clean up."""


class Outcome:
    """The exit code of a command run inside `boundary`: the command's, or the failure's."""

    code: int = 0


@contextlib.contextmanager
def boundary(command: str, resume_hint: str | Callable[[], str] | None = None,
             ) -> Iterator[Outcome]:
    """The boundary around one subcommand: `with boundary(name) as outcome: outcome.code =
    run(...)`; a failure inside is told the user and sets `outcome.code` (see above).

    `resume_hint`: what to say after the interruption of a run, or a function that says it
    from the run's real state when it happens (moat.cli.train.interrupted_hint)."""
    outcome = Outcome()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (e.g. called from a test thread)
        previous = None
    try:
        yield outcome
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        how = "stopped by SIGTERM" if terminated else "interrupted (Ctrl-C)"
        hint = resume_hint() if callable(resume_hint) else resume_hint
        _say(command, how + (f"; {hint}" if hint else ""))
        outcome.code = EXIT_SIGTERM if terminated else EXIT_SIGINT
    except Exception as err:  # noqa: BLE001 - this is the boundary: sorted just below
        message = expected_message(err)
        if message is None:
            traceback.print_exc()
            _say(command, f"internal error ({type(err).__name__}): this is a bug in moat; "
                 "please report it with the traceback above and the command you ran")
            outcome.code = EXIT_BUG
        else:
            _say(command, "error: " + message)
            outcome.code = EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_command(func: Callable[[], int], command: str,
                resume_hint: str | Callable[[], str] | None = None) -> int:
    """`func()` (one subcommand) inside the `boundary`; the exit code."""
    with boundary(command, resume_hint) as outcome:
        outcome.code = func()
    return outcome.code


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


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _say(command: str, text: str) -> None:
    print(f"moat {command}: {text}", file=sys.stderr, flush=True)
