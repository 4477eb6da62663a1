"""Typed task options (moat.tasks.options): defaults, conversion, refusal of unknown keys and
wrong values, with the same kind of messages as TrainConfig."""

from __future__ import annotations

import pytest

from moat.tasks.classification import ClassificationTask
from moat.tasks.detection import DetectionOptions, DetectionTask
from moat.tasks.segmentation import SegmentationOptions, SegmentationTask
from moat.train.config import TrainConfig, load_config


def test_defaults_when_nothing_is_set():
    seg = SegmentationOptions.from_dict({})
    assert (seg.preset, seg.inference, seg.ignore_index, seg.flip_test) == (
        "segmentation", "whole", 255, False)
    assert seg.scale_range == (0.5, 2.0)
    assert seg.output_stride is None  # None: deeplabv3plus's own default (32)
    det = DetectionOptions.from_dict(None)
    assert (det.arch, det.jitter, det.score_threshold, det.preset) == (
        "cascade_mask_rcnn", "multiscale", 0.5, "detection")
    assert det.fpn_channels is None  # None: build_detector's own default (256)


def test_values_are_converted_to_the_field_type():
    # what --set task_options.KEY=VALUE gives: strings parsed like TrainConfig's fields
    config = load_config(None, ["task_options.output_stride=16", "task_options.flip_test=yes",
                                "task_options.scale_range=[0.75, 1.5]",
                                "task_options.slide_crop=32"], task="segmentation")
    seg = SegmentationTask(config).options
    assert seg.output_stride == 16 and isinstance(seg.output_stride, int)
    assert seg.flip_test is True and seg.scale_range == (0.75, 1.5) and seg.slide_crop == 32
    det = DetectionOptions.from_dict({"anchor_sizes": (8, 16, 32, 64, 128), "min_size": 64.0})
    assert det.anchor_sizes == [8, 16, 32, 64, 128] and det.min_size == 64


def test_a_typo_is_refused_with_a_suggestion():
    config = TrainConfig(task="segmentation", task_options={"ouput_stride": 16})
    with pytest.raises(ValueError, match=r"unknown key 'ouput_stride'; did you mean "
                                         r"output_stride\?"):
        SegmentationTask(config)
    with pytest.raises(ValueError, match="did you mean score_threshold"):
        DetectionOptions.from_dict({"score_treshold": 0.3}, "detection")


def test_a_training_setting_is_pointed_to_the_top_level():
    with pytest.raises(ValueError, match=r"bn_momentum is a training setting.*--set bn_momentum"):
        SegmentationOptions.from_dict({"bn_momentum": 0.1}, "segmentation")


def test_a_task_without_options_refuses_every_key():
    with pytest.raises(ValueError, match="classification.*unknown key 'crop'.*no task_options"):
        ClassificationTask(TrainConfig(task_options={"crop": 512}))


@pytest.mark.parametrize("options, message", [
    ({"output_stride": "sixteen"}, "output_stride='sixteen'"),
    ({"flip_test": "maybe"}, "expected true or false"),
    ({"scale_range": [1.0]}, "expected 2 values"),
    ({"output_stride": 8}, "output_stride must be 32 or 16, got 8"),
    ({"inference": "tiles"}, "inference 'tiles' is unknown; choose one of"),
    ({"layout": "coco"}, "layout 'coco' is unknown"),
    ({"scale_range": [2.0, 1.0]}, "scale_range must be"),
    ({"preset": "classification"}, "preset 'classification' is unknown"),
])
def test_wrong_segmentation_values_are_refused(options, message):
    with pytest.raises(ValueError, match="^config: task_options") as err:
        SegmentationOptions.from_dict(options, "segmentation")
    assert message in str(err.value)


@pytest.mark.parametrize("options, message", [
    ({"arch": "yolo"}, "arch 'yolo' is unknown"),
    ({"jitter": "random"}, "jitter 'random' is unknown"),
    ({"score_threshold": 1.5}, "score_threshold must be in [0, 1]"),
    ({"fpn_channels": 0}, "fpn_channels must be >= 1"),
    ({"skip_empty": 3}, "expected true or false"),
])
def test_wrong_detection_values_are_refused(options, message):
    with pytest.raises(ValueError, match="^config: task_options") as err:
        DetectionOptions.from_dict(options, "detection")
    assert message in str(err.value)


def test_the_options_reach_the_model():
    config = TrainConfig(task="detection", model="tiny_moat_0", num_classes=2,
                         task_options={"arch": "faster_rcnn", "fpn_channels": 16,
                                       "representation_size": 32, "min_size": 64})
    model = DetectionTask(config).build_model()
    assert model.backbone.out_channels == 16
    assert model.roi_heads.box_head.fc7.out_features == 32
    assert model.transform.min_size == (64,)


@pytest.mark.parametrize("name, expected", [("tiny_moat_0", True), ("tiny_moat_0_no_pe", False)])
def test_position_embedding_follows_the_model_name_unless_set(name, expected):
    task = ClassificationTask(TrainConfig(model=name, num_classes=3))
    model = task.build_model()
    has_table = any(n.endswith("relative_position_embedding") for n, _ in model.named_parameters())
    assert has_table is expected
    assert task.metadata()["position_embedding"] is expected
    # an explicit setting wins over the name
    explicit = ClassificationTask(TrainConfig(model="tiny_moat_0", position_embedding=False,
                                              num_classes=3))
    assert not any(n.endswith("relative_position_embedding")
                   for n, _ in explicit.build_model().named_parameters())


def test_tasks_read_the_class_count_without_writing_the_config(tmp_path):
    """The data (or a checkpoint) gives the count; the user's config is never rewritten by
    the task (the run records the count in its own config.yaml)."""
    from moat.data.synthetic import write_shapes_dataset

    write_shapes_dataset(tmp_path, num_classes=3, train_per_class=2, val_per_class=1,
                         img_size=32)
    config = TrainConfig(model="tiny_moat_0", data=str(tmp_path), img_size=32)
    task = ClassificationTask(config)
    task.build_datasets()
    assert task.num_classes == 3 and config.num_classes is None
    assert task.build_model().num_classes == 3
    reloaded = ClassificationTask(TrainConfig(model="tiny_moat_0"))
    reloaded.load_metadata(task.metadata())
    assert reloaded.num_classes == 3 and reloaded.config.num_classes is None
    seg = SegmentationTask(TrainConfig(task="segmentation"))
    seg.load_metadata({"num_classes": 150})
    assert seg.num_classes == 150 and seg.config.num_classes is None
