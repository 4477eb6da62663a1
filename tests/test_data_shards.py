"""WebDataset shards and Hugging Face datasets as training data (moat.data.shards, moat.data.hf,
moat.data.sources), exact epochs (moat.data.samplers.ExactSampler), `moat shard`.

The data is written by the `webdataset` and `datasets` packages themselves, not by moat:
crops of three real photos (skimage.data: astronaut, coffee, chelsea), one class each, 32x32
PNG. 28 training samples (10, 9, 9) and 9 validation samples: with a global batch of 8 an
epoch is 3 full batches and one of 4 on one process, and 3 x 4 + 2 per process on two, so
that every sample can be trained exactly once (no micro-batch of a single image).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from moat.cli import main as cli
from moat.data.checks import DataError
from moat.data.samplers import PAD, ExactSampler
from moat.data.shards import INDEX_NAME, ShardDataset, expand_shards
from moat.data.sources import classification_datasets, eval_dataset, open_split
from moat.train.checkpoint import CheckpointManager, read_meta
from moat.train.config import load_config
from moat.train.loop import run_training, train

SRC = str(Path(__file__).resolve().parents[1] / "src")
TRAIN_COUNTS, VAL_COUNTS = (10, 9, 9), (3, 3, 3)
TINY = dict(model="tiny_moat_0", img_size=32, batch_size=8, workers=0, progress=False,
            tensorboard=False, lr=2e-3, warmup_epochs=0.5, log_every_steps=1,
            randaugment=[2, 9], scale=[0.5, 1.0], crop_pct=1.0, ema_decay=0.9, mixup=0.0,
            cutmix=0.0, deterministic=True)


def _photos(counts: tuple[int, ...], seed: int) -> list[tuple[np.ndarray, int]]:
    """(32x32 RGB crop, class) of real photos: class k is crops of photo k."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    rng = np.random.default_rng(seed)
    out = []
    for label, n in enumerate(counts):
        img = photos[label]
        for _ in range(n):
            y, x = rng.integers(0, img.shape[0] - 96), rng.integers(0, img.shape[1] - 96)
            crop = Image.fromarray(img[y:y + 96, x:x + 96]).resize((32, 32), Image.BILINEAR)
            out.append((np.asarray(crop), label))
    order = np.random.default_rng(seed + 1).permutation(len(out))
    return [out[i] for i in order]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(folder: Path, split: str, samples, maxcount: int = 6) -> None:
    with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=maxcount, verbose=0) as w:
        for i, (array, label) in enumerate(samples):
            w.write({"__key__": f"{split}{i:05d}", "png": _png(array), "cls": label})


@pytest.fixture(scope="module")
def photos():
    return _photos(TRAIN_COUNTS, 0), _photos(VAL_COUNTS, 100)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos) -> Path:
    """train-00000{0..4}.tar (6, 6, 6, 6, 4 samples) and val-00000{0,1}.tar in one folder."""
    root = tmp_path_factory.mktemp("wds")
    _write_split(root, "train", photos[0])
    _write_split(root, "val", photos[1])
    return root


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory, photos) -> Path:
    """A DatasetDict (train, validation) saved by `datasets`, with Image and ClassLabel."""
    import datasets

    root = tmp_path_factory.mktemp("hf")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["astronaut", "coffee",
                                                                      "cat"])})

    def table(samples):
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(a) for a, _ in samples],
             "label": [t for _, t in samples]}, features=features)

    datasets.DatasetDict({"train": table(photos[0]), "validation": table(photos[1])}) \
        .save_to_disk(str(root / "dd"))
    (root / "pq").mkdir()
    table(photos[0]).to_parquet(str(root / "pq" / "train.parquet"))
    return root


# --- reading ---------------------------------------------------------------------------------

def test_shards_written_by_webdataset_read_back_exactly(shards, photos):
    train, val = classification_datasets(shards)
    assert isinstance(train, ShardDataset) and isinstance(val, ShardDataset)
    assert (len(train), len(val)) == (28, 9)
    assert train.classes == ["0", "1", "2"] and val.classes == train.classes
    assert train.shard_sizes() == [6, 6, 6, 6, 4]
    assert train.targets_array.tolist() == [t for _, t in photos[0]]
    for i in (0, 7, 27):  # lossless PNG: the very pixels written
        image, target = train[i]
        assert np.array_equal(np.asarray(image), photos[0][i][0]) and target == photos[0][i][1]
    assert train.path(7) == f"{shards / 'train-000001.tar'}:train00007"
    assert (shards / INDEX_NAME).is_file()  # built on first use, cached


def test_pattern_folder_and_list_file_name_the_same_shards(shards, tmp_path):
    pattern = str(shards / "train-{000000..000004}.tar")
    (tmp_path / "list.txt").write_text("".join(f"{shards}/train-00000{k}.tar\n" for k in range(5)))
    folder = tmp_path / "only-train"
    folder.mkdir()
    for k in range(5):
        os.symlink(shards / f"train-00000{k}.tar", folder / f"train-00000{k}.tar")
    sets = [open_split(spec) for spec in (pattern, tmp_path / "list.txt", folder)]
    assert [len(s) for s in sets] == [28, 28, 28]
    assert all(s.targets_array.tolist() == sets[0].targets_array.tolist() for s in sets)
    assert np.array_equal(np.asarray(sets[2].read_image(20)), np.asarray(sets[0].read_image(20)))


def test_shard_errors_before_training(shards, tmp_path):
    with pytest.raises(DataError, match="do not exist"):  # the range goes one too far
        expand_shards(str(shards / "train-{000000..000005}.tar"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# no shards\n")
    with pytest.raises(DataError, match="names no .tar"):
        expand_shards(empty)
    with pytest.raises(DataError, match="image_key"):
        open_split(shards / "train-000000.tar", image_key="jpg")
    # a label outside the training set's class list
    with pytest.raises(ValueError, match="class indices 7 but the training set has only 3"):
        bad = tmp_path / "bad"
        bad.mkdir()
        _write_split(bad, "val", [(np.zeros((8, 8, 3), np.uint8), 7)])
        open_split(bad, classes=["0", "1", "2"])


def test_json_labels_info_json_class_names_and_index_refresh(tmp_path):
    samples = [(np.full((8, 8, 3), 40 * k, np.uint8), name)
               for k, name in enumerate(["cat", "dog", "cat", "bird"])]
    with wds.TarWriter(str(tmp_path / "a.tar")) as w:
        for i, (array, name) in enumerate(samples):
            w.write({"__key__": f"s{i}", "jpg": _png(array),  # any content under jpg
                     "json": json.dumps({"species": name, "label": 99}).encode()})
    (tmp_path / "_info.json").write_text(json.dumps(
        {"class_names": ["dog", "cat", "bird"],
         "splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [4]}}}))
    data = open_split(tmp_path, label_key="species")
    assert data.classes == ["dog", "cat", "bird"]  # _info.json's order, not sorted
    assert data.targets_array.tolist() == [1, 0, 1, 2]
    # the shard changes: the cached index is rebuilt from it
    with wds.TarWriter(str(tmp_path / "a.tar")) as w:
        w.write({"__key__": "s0", "jpg": _png(samples[0][0]),
                 "json": json.dumps({"species": "bird"}).encode()})
    os.utime(tmp_path / "a.tar", ns=(1, 1))
    assert open_split(tmp_path, label_key="species").targets_array.tolist() == [2]


def test_hugging_face_save_to_disk_and_parquet(hf_data, photos):
    train, val = classification_datasets(hf_data / "dd")
    assert (len(train), len(val)) == (28, 9)
    assert train.classes == ["astronaut", "coffee", "cat"]  # from the ClassLabel feature
    assert train.targets_array.tolist() == [t for _, t in photos[0]]
    assert np.array_equal(np.asarray(train[5][0]), photos[0][5][0])
    assert len(eval_dataset(hf_data / "dd", None, train.classes, False)) == 9
    parquet = open_split(hf_data / "pq" / "train.parquet")
    assert len(parquet) == 28 and parquet.classes == train.classes
    with pytest.raises(DataError, match="no label column 'species'"):
        open_split(hf_data / "dd", label_key="species")


def test_hub_name_not_in_the_cache_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets  # read the variables at import: set them where an earlier test imported it
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"must be in the datasets cache, .*"
                       r"load_dataset\('moat-test/not-cached'\)"):
        open_split("hf:moat-test/not-cached")


# --- exact epochs ----------------------------------------------------------------------------

@pytest.mark.parametrize("size,world,batch,accum,shards", [
    (28, 1, 8, 1, [6, 6, 6, 6, 4]), (28, 2, 4, 1, [6, 6, 6, 6, 4]), (29, 3, 2, 2, None),
    (5, 2, 4, 1, [2, 3]), (100, 4, 3, 1, [10] * 10), (29, 1, 4, 1, [6, 6, 6, 6, 5]),
    (13, 2, 3, 2, None)])
def test_exact_sampler_gives_each_sample_once(size, world, batch, accum, shards):
    data = list(range(size))
    epochs = []
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            s = ExactSampler(data, batch_size=batch, accum_steps=accum, seed=3,
                             shard_sizes=shards, num_replicas=world, rank=rank)
            s.set_epoch(epoch)
            per_rank.append(list(s))
            # resuming after k samples gives the rest of the same order
            s.skip(batch)
            assert list(s) == per_rank[-1][batch:]
        assert len({len(r) for r in per_rank}) == 1  # the same steps on every rank
        assert len(per_rank[0]) % (batch * accum) == 0
        real = sorted(i for r in per_rank for i in r if i != PAD)
        assert real == data  # each sample once
        if batch >= 3:  # no micro-batch of a single image (BatchNorm would fail on it)
            for r in per_rank:
                counts = [sum(i != PAD for i in r[b:b + batch]) for b in range(0, len(r), batch)]
                assert 1 not in counts, counts
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]  # a new order every epoch


def test_exact_sampler_keeps_shards_together():
    sizes = [10] * 8
    s = ExactSampler(list(range(80)), batch_size=10, seed=0, shard_sizes=sizes, window=2,
                     num_replicas=2, rank=0)
    shards_read = {i // 10 for i in s}
    assert len(shards_read) == 4  # rank 0 reads half of the shards, not all of them


# --- training --------------------------------------------------------------------------------

def _events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.fixture(scope="module")
def shard_run(shards, tmp_path_factory) -> Path:
    """Two epochs from the shards, a checkpoint after every step (for the resume test)."""
    run = tmp_path_factory.mktemp("shard-run") / "run"
    train(load_config(None, [], data=str(shards), output=str(run), epochs=2,
                      save_every_steps=1, keep_last=100, **TINY))
    return run


def test_training_from_shards_counts_every_sample(shard_run):
    assert [e["train_samples"] for e in _events(shard_run, "epoch")] == [28, 28]
    evals = _events(shard_run, "eval")
    assert [e["images"] for e in evals] == [9, 9]
    assert "trained on 28 of the 28 training samples" in (shard_run / "train.log").read_text()


def test_moat_eval_on_shards_counts_every_validation_sample(shard_run, shards):
    from moat.train.eval_predict import evaluate_checkpoint

    final = read_meta(CheckpointManager(shard_run).latest())["metrics"]
    for data in (shards, shards / "val-{000000..000001}.tar"):
        result = evaluate_checkpoint(shard_run, data, batch_size=4, workers=1,
                                     report_dir=shard_run / "eval-report")
        assert result["metrics"]["images"] == 9
        assert result["metrics"]["top-1"] == pytest.approx(final["top-1"])


def test_training_from_hugging_face_dataset(hf_data, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, [], data=str(hf_data / "dd"), output=str(run), epochs=1, **TINY))
    assert [e["train_samples"] for e in _events(run, "epoch")] == [28]
    assert [e["images"] for e in _events(run, "eval")] == [9]


def test_resumed_mid_epoch_ends_with_the_same_weights(shard_run, tmp_path):
    """A run killed right after its checkpoint of step k (k = 1, 2 in epoch 1, 6 in epoch 2)
    and resumed ends as the uninterrupted run."""
    steps = sorted(CheckpointManager(shard_run).dir.glob("step-*"))
    final = load_file(str(steps[-1] / "model.safetensors"))
    assert read_meta(steps[-1])["step"] == 8
    for k in (1, 2, 6):
        run = tmp_path / f"killed-{k}"
        shutil.copytree(shard_run, run)
        for later in sorted((run / "checkpoints").glob("step-*"))[k:]:
            shutil.rmtree(later)
        (run / "checkpoints" / "latest").write_text(f"step-{k:09d}\n")
        result = run_training(None, [], resume=True, output=str(run), progress=False)
        assert read_meta(result["checkpoint"])["step"] == 8
        resumed = load_file(str(Path(result["checkpoint"]) / "model.safetensors"))
        for name, tensor in final.items():
            assert torch.equal(tensor, resumed[name]), (k, name)
        # the interrupted epoch still counts every sample once
        assert _events(run, "epoch")[-1]["train_samples"] == 28


def test_damaged_shards_are_reported_and_skipped(shards, photos, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    (data / INDEX_NAME).unlink(missing_ok=True)  # built by an earlier test, or not
    blob = (data / "train-000001.tar").read_bytes()
    (data / "train-000001.tar").write_bytes(blob[:len(blob) // 2])  # truncated
    (data / "train-000002.tar").write_bytes(os.urandom(4096))  # not a tar at all
    with wds.TarWriter(str(data / "train-000005.tar")) as w:  # an undecodable image
        w.write({"__key__": "broken", "png": b"\x89PNG not really", "cls": 1})
    run = tmp_path / "run"
    result = train(load_config(None, [], data=str(data), output=str(run), epochs=1, **TINY))
    log = (run / "train.log").read_text()
    assert "skipped damaged shard" in log and "train-000002.tar" in log
    assert any("train-000005.tar:broken" in p for p in result["bad_images"])
    truncated = [p for p in result["bad_images"] if "train-000001.tar" in p]
    index = json.loads((data / INDEX_NAME).read_text())["shards"]
    kept = len(index["train-000001.tar"]["labels"])
    assert 0 < kept < 6
    # trained: the intact shards, the complete samples of the truncated one
    expected = 6 * 2 + 4 + kept - len(truncated)
    assert _events(run, "epoch")[0]["train_samples"] == expected
    assert _events(run, "bad_images")[0]["count"] == len(result["bad_images"])


# --- moat shard ------------------------------------------------------------------------------

def test_moat_shard_writes_what_the_folder_holds(tmp_path, capsys):
    from moat.data.classification import classification_datasets as folder_datasets
    from moat.data.synthetic import write_shapes_dataset

    write_shapes_dataset(tmp_path / "src", num_classes=3, train_per_class=5, val_per_class=2,
                         img_size=32)
    assert cli(["shard", str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "4",
                "--workers", "2"]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar",
        "val-000000.tar", "val-000001.tar"]
    assert not list(out.glob(".tmp-*"))
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == [4, 4, 4, 3]
    folder_train, _ = folder_datasets(tmp_path / "src")
    train, val = classification_datasets(out)
    assert train.classes == folder_train.classes == info["class_names"]
    assert (len(train), len(val)) == (15, 6)
    want = sorted((Path(p).read_bytes(), t) for p, t in folder_train.samples)
    suffix = Path(folder_train.path(0)).suffix[1:]
    got = sorted((train.member(i, suffix), int(train.targets_array[i])) for i in range(len(train)))
    assert got == want  # every image, byte for byte, with its class


# --- several processes -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(groups: list[list[str]], data: Path, output: Path, timeout: float = 600) -> None:
    flags = [f"--set={k}={json.dumps(v) if isinstance(v, list) else v}"
             for k, v in dict(TINY, epochs=1).items()]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *g, "-m",
                               "moat.cli", "train", "--data", str(data), "--output",
                               str(output), *flags], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for g in groups]
    errors = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"torchrun still running after {timeout} s (a hang)")
        errors.append(err)
        assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_processes_train_every_sample_once(shards, tmp_path):
    run = tmp_path / "two"
    _torchrun([["--standalone", "--nproc_per_node", "2"]], shards, run)
    assert [e["train_samples"] for e in _events(run, "epoch")] == [28]
    assert [e["images"] for e in _events(run, "eval")] == [9]
    assert read_meta(CheckpointManager(run).latest())["world_size"] == 2


@pytest.mark.slow
def test_two_nodes_train_one_model_from_shards(shards, tmp_path):
    """Two torchrun groups (--nnodes 2, node ranks 0 and 1) meeting at one rendezvous, as two
    machines would; gloo on the CPU."""
    port = _free_port()
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "moat-test"]
    run = tmp_path / "nodes"
    _torchrun([common + ["--node-rank", "0"], common + ["--node-rank", "1"]], shards, run)
    assert [e["train_samples"] for e in _events(run, "epoch")] == [28]
    assert [e["images"] for e in _events(run, "eval")] == [9]
    assert read_meta(CheckpointManager(run).latest())["world_size"] == 2
