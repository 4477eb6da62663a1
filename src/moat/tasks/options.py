"""Typed task options: the settings a task adds to `TrainConfig`, one dataclass per task.

They are written as `task_options` in a config file or `--set task_options.KEY=VALUE` on the
command line, and checked like `TrainConfig` itself: each value is converted to its field's
type (`TrainConfig`'s own conversion), an unknown key is refused with the nearest known
one(s), and `validate()` names the first wrong value and what it may be. A key that is a
`TrainConfig` setting gets the hint to set it there.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from moat.errors import InvalidInputError
from moat.train.settings import TrainConfig
from moat.train.typed import coerce

O = TypeVar("O", bound="TaskOptions")

_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclasses.dataclass
class TaskOptions:
    """Base of every task's options; a task without options refuses every key."""

    @classmethod
    def from_dict(cls: type[O], values: Mapping[str, Any] | None, task: str = "") -> O:
        """The options with `values` applied over the defaults, converted and validated."""
        fields = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        options = cls()
        where = f"task_options of task {task!r}" if task else "task_options"
        for key, value in (values or {}).items():
            if key not in fields:
                raise InvalidInputError(f"config: {where}: unknown key {key!r}{_hint(key, fields)}")
            try:
                setattr(options, key, coerce(value, hints[key]))
            except (TypeError, ValueError) as err:
                raise InvalidInputError(f"config: {where}: {key}={value!r}: {err}") from None
        options.validate()
        return options

    def validate(self) -> None:
        """Raise ValueError naming the first wrong value (subclasses check their fields)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def need(ok: bool, message: str) -> None:
    """`TrainConfig.validate`'s error style for the options' checks."""
    if not ok:
        raise InvalidInputError(f"config: task_options: {message}")


def _hint(key: str, fields: set[str]) -> str:
    if key in _TRAIN_FIELDS:
        return f"; {key} is a training setting: set it at the top level (--set {key}=VALUE)"
    close = difflib.get_close_matches(key, fields, n=3)
    if close:
        return f"; did you mean {' or '.join(close)}?"
    return f"; known keys: {', '.join(sorted(fields))}" if fields else \
        "; this task has no task_options"
