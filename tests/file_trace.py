"""Which moat files a call goes through, and whether it comes back into one (sys.setprofile).

    PYTHONPATH=src python tests/file_trace.py    # create_model(pretrained=True), moat train

A file is *entered* when one of its functions is called from another moat file (calls
through torch or Python in between count for the nearest moat caller; calls within a file
and import time do not count). An entry that goes on into another moat file is a *visit*;
one that answers and returns (a property, a catalogue entry, a header read, a path check) is
a lookup.

The rule "a call enters each file once": no call comes back up into a file still waiting
below it (A -> B -> A: `callbacks`), and each file inside a package is visited from one file
only (`callers`); the modules at the top of `moat` (errors, paths, integrity, ...) serve
every layer. A caller using a part again (a model building its blocks, the training loop
calling its task every step) is one visit from one file. `create_model(pretrained=True)`
keeps both from the cache, and the first on the first download (tests/test_package.py). A
`moat train` run keeps the first; its objects (the task, the settings, the loaders) are used
by the assembly, the loop and the run that saves it: several callers, one direction (no two
files visit each other, `mutual`, but a task and the base class whose template methods call
it).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "moat"


def _moat_file(filename: str, root: str) -> str | None:
    return filename[len(root) + 1:] if filename.startswith(root) else None


@dataclass
class Entry:
    file: str             # the file entered, relative to src/moat
    caller: str | None    # the nearest moat file below it on the stack (None: from outside)
    stack: tuple[str, ...]  # the moat files on the stack below it, outermost first
    function: str         # the function called
    parent: int | None = None  # the entry whose call made this one (None: the outermost)


@dataclass
class FileTrace:
    """Records every entry into a moat file while it is active (`with FileTrace() as t:`)."""

    root: Path = ROOT
    entries: list[Entry] = field(default_factory=list)

    def __enter__(self) -> FileTrace:
        root = str(self.root)
        local = threading.local()  # per thread: [(frame, entry index)] of entries not returned

        def profile(frame, event, arg):
            open_entries = getattr(local, "open", None)
            if open_entries is None:
                open_entries = local.open = []
            if event == "return":
                if open_entries and open_entries[-1][0] is frame:
                    open_entries.pop()
                return
            if event != "call":
                return
            file = _moat_file(frame.f_code.co_filename, root)
            if file is None:
                return
            stack, caller, up = [], None, frame.f_back
            while up is not None:
                if up.f_code.co_filename.startswith("<frozen importlib"):
                    return  # import time (module bodies, import hooks): not the call traced
                below = _moat_file(up.f_code.co_filename, root)
                if below is not None:
                    if caller is None:
                        caller = below
                    if not stack or stack[-1] != below:
                        stack.append(below)
                up = up.f_back
            if caller != file:
                parent = open_entries[-1][1] if open_entries else None
                self.entries.append(Entry(file, caller, tuple(reversed(stack)),
                                          frame.f_code.co_qualname, parent))
                open_entries.append((frame, len(self.entries) - 1))

        self._profile = profile
        sys.setprofile(profile)
        threading.setprofile(profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)
        threading.setprofile(None)

    def path(self) -> list[str]:
        """The files entered, in order, consecutive repeats collapsed."""
        out: list[str] = []
        for entry in self.entries:
            if not out or out[-1] != entry.file:
                out.append(entry.file)
        return out

    def visits(self) -> list[Entry]:
        """The entries that go on into another moat file; the others are lookups (a property,
        a catalogue entry, a header read, a path check) that answer and return."""
        parents = {entry.parent for entry in self.entries}
        return [e for i, e in enumerate(self.entries) if i in parents and e.caller is not None]

    def callers(self) -> dict[str, list[str]]:
        """{file: the files its visits came from, in order}, for files inside a package (the
        modules at the top of `moat`, errors, paths, integrity..., serve every layer)."""
        found: dict[str, list[str]] = {}
        for entry in self.visits():
            if "/" in entry.file and entry.caller not in found.setdefault(entry.file, []):
                found[entry.file].append(entry.caller)
        return found

    def mutual(self) -> set[tuple[str, str]]:
        """Pairs of files that visit each other (A visits B and B visits A, at any depth)."""
        edges = {(e.caller, e.file) for e in self.visits()}
        return {tuple(sorted(edge)) for edge in edges if edge[::-1] in edges}

    def callbacks(self) -> list[Entry]:
        """Entries into a file that is still waiting below them on the stack (A -> B -> A):
        control coming back up instead of going on down."""
        return [entry for entry in self.entries if entry.file in entry.stack]


def report(trace: FileTrace, title: str) -> str:
    visits = trace.visits()
    lines = [f"== {title}: {len(trace.entries)} entries into {len(set(trace.path()))} files, "
             f"{len(visits)} of them visits (going on into other files)"]
    back = {(e.file, e.function): e for e in trace.callbacks()}
    lines.append(f"calls back into a file waiting below ({len(back)}):")
    lines += [f"  {e.file}:{e.function}  [{' > '.join(e.stack)}]" for e in back.values()]
    several = {f: c for f, c in trace.callers().items() if len(c) > 1}
    lines.append(f"visited from more than one file ({len(several)}):")
    lines += [f"  {file}: from {', '.join(c)}" for file, c in several.items()]
    mutual = sorted(trace.mutual())
    lines.append(f"files that visit each other ({len(mutual)}):")
    lines += [f"  {a} <-> {b}" for a, b in mutual]
    return "\n".join(lines)


# --- the traces ----------------------------------------------------------------------------

REFERENCE_PREFIX = ROOT.parents[2].parent / "shared" / "reference" / "tf1_checkpoint" / "tiny_moat0"


def release_bucket(folder: Path, prefix: Path = REFERENCE_PREFIX) -> Path:
    """A local stand-in of the release bucket holding tiny-MOAT-0's archive (the reference
    checkpoint `prefix` packed like a release); point MOAT_WEIGHTS_URL at `folder.as_uri()`."""
    from moat.weights.catalogue import release
    from tf_writer import make_archive

    folder.mkdir(parents=True, exist_ok=True)
    make_archive(folder / release("tiny_moat_0").file, prefix, arcdir="tiny_moat0")
    return folder


def trace_create_model() -> FileTrace:
    """`moat.create_model("tiny_moat_0", pretrained=True)`: the first call downloads and
    converts the release, the others read it from the cache."""
    import moat

    with FileTrace() as trace:
        moat.create_model("tiny_moat_0", pretrained=True)
    return trace


def trace_train(folder: Path) -> FileTrace:
    """One epoch of `moat train` on tiny-MOAT-0, 8 generated 32 px images, in-process."""
    from moat.cli import main
    from moat.data.synthetic import write_shapes_dataset

    data = folder / "shapes"
    write_shapes_dataset(data, num_classes=2, train_per_class=4, val_per_class=2, img_size=32)
    args = ["train", "--data", str(data), "--model", "tiny_moat_0", "--epochs", "1",
            "--img-size", "32", "--batch-size", "4", "--workers", "0", "--output",
            str(folder / "run"), "--no-progress", "--set", "tensorboard=false"]
    with FileTrace() as trace:
        if main(args) != 0:
            raise RuntimeError("moat train failed")
    return trace


def main() -> None:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MOAT_HOME"] = str(Path(tmp) / "home")
        os.environ["MOAT_WEIGHTS_URL"] = release_bucket(Path(tmp) / "bucket").as_uri()
        print(report(trace_create_model(), "create_model(pretrained=True), first download"))
        print(report(trace_create_model(), "create_model(pretrained=True)"))
        print(report(trace_train(Path(tmp)), "moat train, one epoch"))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
