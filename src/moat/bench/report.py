"""What a benchmark reports: the environment recorded with every row (versions, hardware,
load), a markdown table of the rows and a CSV of every field. The PyTorch and the ONNX
Runtime benchmarks share the columns."""

from __future__ import annotations

import csv
import io
import os
import platform
from collections.abc import Sequence

import torch

from moat.allocator import allocator_setting
from moat.atomic import atomic_write_text
from moat.cpu import cpu_info
from moat.errors import InvalidInputError


def environment(device: str = "cpu") -> dict[str, str]:
    """Versions and hardware recorded with every result."""
    import moat

    cpu = cpu_info()
    env = {"torch": torch.__version__, "moat": moat.__version__,
           "python": platform.python_version(), **cpu.as_dict(),
           "cpu_description": cpu.describe(), "cpu_count": str(os.cpu_count()),
           "device": device,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
           "allocator": allocator_setting(),
           "load_average": f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""}
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = ""
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


COLUMNS = [("model", "model", "{}"), ("mode", "mode", "{}"), ("img_size", "size", "{}"),
           ("batch", "batch", "{}"), ("dtype", "dtype", "{}"), ("threads", "thr", "{}"),
           ("params_m", "params (M)", "{:.2f}"), ("gmacs", "GMACs/img", "{:.3f}"),
           ("time_ms", "ms/batch", "{:.1f}"), ("img_per_s", "img/s", "{:.2f}"),
           ("gmacs_per_s", "GMAC/s", "{:.2f}"), ("best_gmacs_per_s", "best GMAC/s", "{:.2f}"),
           ("ratio_to_moat", "vs MOAT", "{:.2f}"),
           ("latency_ms", "b1 latency (ms)", "{:.1f}"), ("peak_mem_mib", "peak mem (MiB)",
                                                         "{:.0f}")]


def with_ratio_to_moat(rows: list[dict], reference: dict | None) -> list[dict]:
    """`rows` with their 'vs MOAT' column: GMAC/s over the `reference` MOAT row's."""
    for row in rows:
        row["ratio_to_moat"] = (row["gmacs_per_s"] / reference["gmacs_per_s"]
                                if reference else None)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of the rows, with the environment underneath."""
    header = [title for _, title, _ in COLUMNS]
    body = [[("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in COLUMNS]
            for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in body]
    if rows:
        env = rows[0]
        lines.append(f"\ntorch {env['torch']}, moat {env['moat']}, timm {env['timm'] or '-'}, "
                     f"python {env['python']}, CPU: {env['cpu_description']} "
                     f"({env['cpu_count']} CPUs), "
                     f"device {env['device']}{', ' + env['gpu'] if env.get('gpu') else ''}, "
                     f"OMP_WAIT_POLICY={env['omp_wait_policy'] or 'unset'}, "
                     f"allocator: {env['allocator']}, load average "
                     f"{env['load_average'] or '-'} at the start; "
                     f"median of {rows[0]['repeats']} interleaved runs after "
                     f"{rows[0]['warmup']} warm-up (best: the fastest run); 'vs MOAT': "
                     "GMAC/s over the compared MOAT row's (the optimized one if measured)")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """All fields of every row, environment included, one row per model and configuration."""
    if not rows:
        raise InvalidInputError("no rows to write")
    fields = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())  # a failed write keeps an earlier file whole
