"""`--data hf:NAME`: a Hugging Face dataset name read offline from the `datasets` cache
(moat.data.hf), trained and evaluated through the CLI.

An online `datasets.load_dataset("user/name")` of a Hub dataset of parquet files (what
`push_to_hub` writes: data/SPLIT-00000-of-00001.parquet) runs the packaged parquet builder with
repo_id "user/name", dataset_name "name", config "default" and the repository's commit as its
hash over `hf://datasets/user/name@COMMIT/data/...`, and keeps what the builder writes:
$HF_DATASETS_CACHE/user___name/default/0.0.0/COMMIT/ (dataset_info.json, name-SPLIT.arrow).
Offline, `load_dataset` reads the newest such folder (datasets.load.CachedDatasetModuleFactory,
the packaged `cache` builder). There is no network here, so `_cache_as_online_load` runs that
same builder with the same arguments over the same files laid out locally, and the tests then
read the name with HF_HUB_OFFLINE=1, as a machine without network access would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_shards import TRAIN_COUNTS, VAL_COUNTS, _events, _photos

from moat.cli import main as cli
from moat.data import hf
from moat.data.checks import DataError
from moat.data.sources import classification_datasets, eval_dataset, open_split

COMMIT = "3c1f6a0e9b7d5c2a8e4f1b0d6c9a7e5f3b2d1c0a"  # a Hub commit: the cache folder's hash
CLASSES = ["astronaut", "coffee", "cat"]
TRAIN_FLAGS = ["--model", "tiny_moat_0", "--img-size", "32", "--batch-size", "8", "--epochs",
               "1", "--workers", "0", "--no-progress", "--no-tensorboard", "--lr", "2e-3",
               "--warmup-epochs", "0.5", "--crop-pct", "1.0", "--mixup", "0", "--cutmix", "0",
               "--deterministic"]


def _cache_as_online_load(root: Path, repo_id: str, splits: dict, config: str = "default"):
    """Fill the datasets cache as an online `load_dataset(repo_id)` of these splits would."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    repo = root / "hf:" / "datasets" / f"{repo_id}@{COMMIT}" / config
    files = {}
    for split, table in splits.items():
        files[split] = str(repo / "data" / f"{split}-00000-of-00001.parquet")
        Path(files[split]).parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(files[split])
    with pytest.MonkeyPatch.context() as mp:
        # The builder checks that each file is hf://datasets/REPO_ID@COMMIT/... by its path
        # relative to "hf://", which locally is the folder "hf:" in the working directory.
        mp.chdir(root)
        builder = Parquet(repo_id=repo_id, dataset_name=repo_id.split("/")[-1], hash=COMMIT,
                          config_name=config, config_id=config, data_files=files)
    builder.download_and_prepare()


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """Offline, with a datasets cache holding moat-test/photos (train, validation: image,
    label), moat-test/named (train, test: thumb, picture, species) and moat-test/configs (two
    configurations)."""
    import datasets
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("hub")
    train, val = _photos(TRAIN_COUNTS, 0), _photos(VAL_COUNTS, 100)
    labelled = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CLASSES)})
    named = datasets.Features({"thumb": datasets.Image(), "picture": datasets.Image(),
                               "species": datasets.Value("string")})

    def photos(samples):
        return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a, _ in samples],
                                           "label": [t for _, t in samples]}, features=labelled)

    def renamed(samples):
        thumb = Image.new("RGB", (4, 4))
        return datasets.Dataset.from_dict(
            {"thumb": [thumb] * len(samples), "picture": [Image.fromarray(a) for a, _ in samples],
             "species": [CLASSES[t] for _, t in samples]}, features=named)

    with pytest.MonkeyPatch.context() as mp:
        home = root / "home"
        for variable, value in (("HF_HOME", str(home)), ("HF_HUB_OFFLINE", "1"),
                                ("HF_DATASETS_OFFLINE", "1")):
            mp.setenv(variable, value)
        # read at import, which an earlier test in this process may have done
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        _cache_as_online_load(root, "moat-test/photos",
                              {"train": photos(train), "validation": photos(val)})
        _cache_as_online_load(root, "moat-test/named",
                              {"train": renamed(train), "test": renamed(val)})
        for config in ("small", "large"):
            _cache_as_online_load(root, "moat-test/configs", {"train": photos(val)}, config)
        yield home / "datasets", train, val


def test_the_cache_is_laid_out_as_an_online_load_leaves_it(hub_cache):
    cache, _, _ = hub_cache
    folder = cache / "moat-test___photos" / "default" / "0.0.0" / COMMIT
    assert sorted(p.name for p in folder.iterdir()) == [
        "dataset_info.json", "photos-train.arrow", "photos-validation.arrow"]
    info = json.loads((folder / "dataset_info.json").read_text())
    assert (info["builder_name"], info["config_name"]) == ("parquet", "default")
    assert {s: v["num_examples"] for s, v in info["splits"].items()} == {
        "train": 28, "validation": 9}


def test_train_and_eval_a_hub_name_offline(hub_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--data", "hf:moat-test/photos", "--output", str(run),
                *TRAIN_FLAGS]) == 0
    assert [e["train_samples"] for e in _events(run, "epoch")] == [28]
    assert [e["images"] for e in _events(run, "eval")] == [9]
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(run), "--data", "hf:moat-test/photos",
                "--workers", "0", "--report", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].endswith("(9 images)")
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["images"] == 9
    rows = (tmp_path / "report" / "per_class.csv").read_text().splitlines()[1:]
    # class names from the ClassLabel feature, each class's validation images counted
    assert [(r.split(",")[0], int(r.split(",")[2])) for r in rows] == list(zip(CLASSES,
                                                                               VAL_COUNTS))
    train, val = classification_datasets("hf:moat-test/photos")
    assert hf.load_splits("hf:moat-test/photos")["validation"] is \
        hf.load_splits("hf:moat-test/photos:validation")["validation"]  # loaded once
    assert (len(train), len(val), train.classes) == (28, 9, CLASSES)
    assert np.array_equal(np.asarray(val[4][0]), hub_cache[2][4][0])  # the very pixels


def test_named_columns_and_a_named_split(hub_cache, tmp_path, capsys):
    _, train_photos, val_photos = hub_cache
    with pytest.raises(DataError, match="no label column.*'species'.*label_key=COLUMN"):
        open_split("hf:moat-test/named")
    keys = {"image_key": "picture", "label_key": "species"}
    train, val = classification_datasets("hf:moat-test/named", **keys)
    assert val is None  # train and test: no validation split unless named
    assert len(train) == 28 and train.classes == sorted(CLASSES)  # from the labels
    assert np.array_equal(np.asarray(train[5][0]), train_photos[5][0])  # not the thumb
    test = open_split("hfds/moat-test/named:test", classes=train.classes, **keys)
    assert test.targets_array.tolist() == [sorted(CLASSES).index(CLASSES[t])
                                           for _, t in val_photos]
    with pytest.raises(DataError, match="hf:moat-test/named:test"):
        eval_dataset("hf:moat-test/named", None, train.classes, False, **keys)
    with pytest.raises(DataError, match=r"no split 'valid'; its splits are \['test', 'train'\]"):
        open_split("hf:moat-test/named:valid", **keys)
    # the same through the CLI: columns named once at training, kept by the checkpoint
    run = tmp_path / "run"
    assert cli(["train", "--data", "hf:moat-test/named", "--val-data", "hf:moat-test/named:test",
                "--image-key", "picture", "--label-key", "species", "--output", str(run),
                *TRAIN_FLAGS]) == 0
    assert [e["train_samples"] for e in _events(run, "epoch")] == [28]
    assert [e["images"] for e in _events(run, "eval")] == [9]
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(run), "--data", "hf:moat-test/named:test",
                "--workers", "0", "--report", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("(9 images)")


def test_several_cached_configurations_are_refused_with_the_fix(hub_cache):
    with pytest.raises(DataError, match="(?s)small, large.*save_to_disk"):
        open_split("hf:moat-test/configs")


def test_a_folder_trains_against_a_hub_names_validation_split(hub_cache, tmp_path):
    """--data FOLDER --val-data hf:NAME reads NAME's validation split, not its train split."""
    _, train_photos, _ = hub_cache
    for i, (pixels, label) in enumerate(train_photos):
        (tmp_path / CLASSES[label]).mkdir(exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / CLASSES[label] / f"{i}.png")
    train, val = classification_datasets(tmp_path, "hf:moat-test/photos")
    assert (len(train), len(val), val.classes) == (28, 9, sorted(CLASSES))
