"""What the running app holds, handed to the UI, the console and the scheduler.

One object instead of globals, so tests can build several independent apps in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from assistant.holder import ModelHolder
from assistant.settings import Settings
from feedback.registry import Registry
from feedback.store import FeedbackStore


@dataclass
class AppContext:
    settings: Settings
    store: FeedbackStore
    registry: Registry
    holder: ModelHolder
    scheduler: Any = None  # retrain.scheduler.RetrainScheduler when the app schedules retrains
    extras: dict[str, Any] = field(default_factory=dict)
