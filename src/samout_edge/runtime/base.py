"""One interface over every backend, as Polygraphy does it: loaders build runners,
runners only run.

``run(input_ids, state) -> (logits, new_state)``: state is a dict keyed by the
graph's input names (past_max.{i} or past_key_values.{i}.key/.value), so the
state one call returns feeds the next call unchanged. Arrays stay in the
backend's own type (numpy for ONNX Runtime, torch tensors for torch, device
arrays for TensorRT) so a decode loop never copies through the host;
``to_numpy`` is for comparing. Every runner is a context manager: leaving the
``with`` block frees its session, context, stream and buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from samout_edge.artifact.config import ModelConfig

State = dict[str, Any]


@dataclass(frozen=True)
class RunnerInfo:
    backend: str  # torch | ort | tensorrt
    device: str  # cpu | cuda | the ORT provider | the engine's profile
    arch: str
    dtype: str  # fp32 | fp16
    logits: str  # last | all
    max_seq: int | None  # None: no limit (eager torch)
    config: ModelConfig
    max_batch: int | None = None  # None: no limit (a TensorRT engine has one per profile)


class Runner(ABC):
    info: RunnerInfo

    @abstractmethod
    def initial_state(self, batch: int) -> State:
        """The state before any token."""

    @abstractmethod
    def run(self, input_ids: np.ndarray, state: State) -> tuple[Any, State]:
        """Logits for ``input_ids`` ([batch, seq] int64) after ``state``, and the new state."""

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def host_state(self, state: State) -> dict[str, np.ndarray]:
        """The state as numpy arrays in the graph's own dtypes: to store it, or to
        stack several sessions' states into one batch."""
        return {name: np.asarray(self.to_numpy(value)) for name, value in state.items()}

    def synchronize(self) -> None:  # noqa: B027 - deliberately optional
        """Wait for queued device work (timing needs it); a no-op on the CPU."""

    def close(self) -> None:  # noqa: B027 - deliberately optional
        """Free what the runner holds; it cannot run afterwards."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def name(self) -> str:
        return f"{self.info.backend}:{self.info.device}"
