"""The package surface: `import moat` is cheap and lazy, timm registration still works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_import_moat_is_lazy_and_timm_registers_on_import():
    out = _run("""
import sys, moat
heavy = ("moat.weights", "moat.export", "moat.flops", "moat.timm_registry", "timm")
print(sorted(m for m in sys.modules if m.startswith(heavy)))
assert "create_model" in dir(moat) and "save_pretrained" in moat.__all__
model = moat.create_model("tiny_moat_0")            # a public name imports what it needs
import timm                                          # after moat: the variants register
print(type(timm.create_model("tiny_moat_0_no_pe")).__name__, "moat.export" in sys.modules)
""")
    assert out.splitlines() == ["[]", "MoatNet False"]


def test_timm_imported_first_also_sees_moat():
    assert _run("import timm, moat; print(timm.create_model('tiny_moat_1').num_classes)") == "1000"
