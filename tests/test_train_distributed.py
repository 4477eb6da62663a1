"""Two CPU processes (torchrun, gloo, SyncBatchNorm) with the same global batch as one process
end with the same weights, within floating-point tolerance.

Tolerance: the relative difference of the weight *updates*, ||w_2proc - w_1proc|| /
||w_1proc - w_init|| over all parameters, must be below 1e-4 (measured: 6e-6). The runs
differ only in summation order (per-process partial sums, gloo all-reduce, 1 vs 2 threads,
SyncBatchNorm's sum/sum-of-squares statistics vs BatchNorm's two-pass variance), i.e. by
float32 rounding that a few steps amplify a little. The test uses SGD: AdamW divides each
gradient element by its running RMS, so elements with tiny gradients take ~lr-sized steps
whose sign rounding can flip (a conv bias right before BatchNorm has a true gradient of zero
and moves on rounding noise alone); that amplification says nothing about the distributed
implementation (with AdamW at lr 1e-3 the same measure is ~7e-3). Augmentation stays on: it is seeded per sample, so both runs
see identical crops; Mixup/CutMix are off because they mix pairs within a process's batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moat
from moat.train.checkpoint import CheckpointManager, read_meta
from moat.train.config import load_config
from moat.train.loop import train

pytestmark = pytest.mark.slow  # two torchrun processes

SRC = str(Path(__file__).resolve().parents[1] / "src")
SETTINGS = dict(model="tiny_moat_0", img_size=32, epochs=1, batch_size=16, workers=0,
                progress=False, tensorboard=False, optimizer="sgd", lr=0.05, warmup_epochs=0,
                clip_grad=1.0, sync_bn=True, deterministic=True, mixup=0.0, cutmix=0.0,
                randaugment=[2, 9], crop_pct=1.0, log_every_steps=1, ema_decay=0.9)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from moat.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes6")
    write_shapes_dataset(root, num_classes=6, train_per_class=8, val_per_class=2, img_size=32)
    return root  # 48 training images: 3 steps of 16 (2 x 8 per process)


def _train_two_processes(settings: dict, output: Path,
                         program: tuple[str, ...] = ("-m", "moat.cli"),
                         timeout: float = 900) -> None:
    """`moat train` (run by `program`) in two CPU processes under torchrun. A run still going
    after `timeout` seconds (a hang) is stopped, torchrun stopping its workers, and fails."""
    flags = [f"--set={k}={json.dumps(v) if isinstance(v, list) else v}"
             for k, v in settings.items()]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *program, "train", "--output", str(output), *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun sends its workers SIGTERM, then SIGKILL after 30 s
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        pytest.fail(f"two-process training still running after {timeout} s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]


def test_two_processes_match_one(data, tmp_path):
    torch.manual_seed(123)
    init = moat.create_model("tiny_moat_0", num_classes=6).state_dict()
    init_file = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in init.items()}, str(init_file))
    settings = dict(SETTINGS, data=str(data), init_from=str(init_file))

    two = tmp_path / "two"
    _train_two_processes(settings, two)

    one = tmp_path / "one"
    train(load_config(None, [], output=str(one), **settings))

    ckpt_one, ckpt_two = CheckpointManager(one).latest(), CheckpointManager(two).latest()
    meta_one, meta_two = read_meta(ckpt_one), read_meta(ckpt_two)
    assert meta_one["step"] == meta_two["step"] == 3
    assert meta_two["world_size"] == 2
    w1, w2 = (load_file(str(c / "model.safetensors")) for c in (ckpt_one, ckpt_two))
    params = [k for k in w1 if w1[k].is_floating_point() and "running_" not in k]
    diff = sum(((w2[k] - w1[k]).double() ** 2).sum() for k in params).sqrt()
    update = sum(((w1[k] - init[k]).double() ** 2).sum() for k in params).sqrt()
    assert update > 0.1  # the runs did train
    assert diff / update < 1e-4, f"relative difference {float(diff / update):.2e}"
    for k in w1:  # BatchNorm running statistics: global-batch statistics in both
        if "running_" in k:
            assert torch.allclose(w1[k], w2[k], rtol=1e-3, atol=1e-4), k
    # evaluation is sharded over the two processes and reduced: same numbers
    m1, m2 = meta_one["metrics"], meta_two["metrics"]
    assert m1["images"] == m2["images"] == 12
    assert abs(m1["top-1"] - m2["top-1"]) <= 100 / 12 + 1e-6  # at most one borderline image
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-2)

    # rank 0 alone writes logs and metrics
    events = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3]
    assert (two / "config.yaml").is_file() and (two / "train.log").is_file()
    assert "2 process(es)" in (two / "train.log").read_text()


def _relative_update_difference(a: dict, b: dict, init: dict) -> float:
    params = [k for k in a if a[k].is_floating_point() and "running_" not in k]
    diff = sum(((b[k] - a[k]).double() ** 2).sum() for k in params).sqrt()
    update = sum(((a[k] - init[k]).double() ** 2).sum() for k in params).sqrt()
    assert update > 0.01  # the runs did train
    return float(diff / update)


def test_two_processes_adamw_ema_accumulation_match_one(data, tmp_path):
    """AdamW, EMA and 2 accumulation steps (global batch 16): two processes with micro-batches
    of 4 (SyncBatchNorm over 8) against one process with micro-batches of 8; both normalise
    the same 8 images per micro-batch (a micro-batch of 16 would not: accumulation changes
    BatchNorm's batch). AdamW amplifies float rounding (see the module
    docstring: ~7e-3 here), so the bound is 3e-2; a real fault is larger: e.g. a loss not
    divided by the accumulation steps doubles the gradient, which gradient clipping at norm
    1.0 turns into a different step, and a missing all-reduce halves the data per update."""
    torch.manual_seed(321)
    init = moat.create_model("tiny_moat_0", num_classes=6).state_dict()
    init_file = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in init.items()}, str(init_file))
    settings = dict(SETTINGS, data=str(data), init_from=str(init_file), optimizer="adamw",
                    lr=1e-3, weight_decay=0.05, ema=True, ema_decay=0.5, accum_steps=2)

    two = tmp_path / "two"
    _train_two_processes(settings, two)
    one = tmp_path / "one"
    train(load_config(None, [], output=str(one), **settings))

    ckpt_one, ckpt_two = CheckpointManager(one).latest(), CheckpointManager(two).latest()
    assert read_meta(ckpt_one)["step"] == read_meta(ckpt_two)["step"] == 3
    for which in ("model", "ema"):
        w1, w2 = (load_file(str(c / f"{which}.safetensors")) for c in (ckpt_one, ckpt_two))
        assert _relative_update_difference(w1, w2, init) < 3e-2, which


# Run by torchrun in each process: `moat train`, then this process's parameters to a file in
# the folder given as the first argument.
SAVE_PARAMETERS = """
import os, sys
from safetensors.torch import save_file
import moat.train.loop as loop
fit = loop.Trainer.fit
def fit_and_save(self):
    result = fit(self)
    params = {k: p.detach().contiguous() for k, p in self.run.model.named_parameters()}
    save_file(params, os.path.join(sys.argv[1], f"rank{self.run.info.rank}.safetensors"))
    return result
loop.Trainer.fit = fit_and_save
from moat.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_batch_without_readable_images_on_one_process(tmp_path):
    """Process 1's first micro-batch is only unreadable files (inside `no_sync`: it starts an
    accumulation, before that process has read any image), process 0's fourth has one image
    left (it ends an accumulation, so its backward all-reduces). Both processes still run
    DDP's and SyncBatchNorm's collectives (`Trainer._skipped_loss`): the run ends, instead of
    hanging (caught by the timeout) or failing on collectives out of step, with the same
    parameters in both processes."""
    from moat.data.classification import ImageFolderDataset
    from moat.data.samplers import EpochSampler
    from moat.data.synthetic import write_shapes_dataset

    data = tmp_path / "data"
    write_shapes_dataset(data, num_classes=3, train_per_class=8, val_per_class=1, img_size=32)
    train_set = ImageFolderDataset(data / "train")  # 24 images: 6 micro-batches of 2 each
    order = []
    for rank in (0, 1):  # the files each process trains on, in order (seed 0, epoch 0)
        sampler = EpochSampler(train_set, seed=0, drop_last=True, num_replicas=2, rank=rank)
        sampler.set_epoch(0)
        order.append([train_set.path(i) for _, i in sampler])
    bad = order[1][0:2] + order[0][6:7]
    for path in bad:
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))

    torch.manual_seed(7)
    init = moat.create_model("tiny_moat_0", num_classes=3).state_dict()
    save_file({k: v.contiguous() for k, v in init.items()}, str(tmp_path / "init.safetensors"))
    settings = dict(SETTINGS, data=str(data), init_from=str(tmp_path / "init.safetensors"),
                    seed=0, batch_size=8, accum_steps=2)
    driver = tmp_path / "save_parameters.py"
    driver.write_text(SAVE_PARAMETERS)
    run = tmp_path / "run"
    _train_two_processes(settings, run, program=(str(driver), str(tmp_path)), timeout=300)

    assert read_meta(CheckpointManager(run).latest())["step"] == 3
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    reported = [f for e in events if e["event"] == "bad_images" for f in e["files"]]
    assert sorted(reported) == sorted(bad)  # both processes' skipped files, gathered
    p0, p1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    different = [k for k in p0 if not torch.equal(p0[k], p1[k])]
    assert not different, f"{len(different)} parameters differ, e.g. {different[:3]}"
    update = sum(((p0[k] - init[k]).double() ** 2).sum() for k in p0).sqrt()
    assert update > 0.01  # the run did train
