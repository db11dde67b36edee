"""The tasks the one training loop (`rvm.train.loop`) trains, one module or package per family.

A task module exposes `load_data(config)` (host data), `make_task(config, data, mesh)`
(a `rvm.train.task.Task`) and `validate(config)` (its fields, before anything
compiles); `config.task` picks it from `MODULES`.
"""

from __future__ import annotations

from types import ModuleType

from rvm.tasks import glimpses, image, tracker
from rvm.tasks.thinking import task as thinking
from rvm.tasks.video import task as video
from rvm.tasks.video_objects import task as video_objects

MODULES: dict[str, ModuleType] = {
    "glimpses": glimpses,
    "image": image,
    "motion": video,
    "prediction": video,
    "thinking": thinking,
    "tracker": tracker,
    "video_objects": video_objects,
}
