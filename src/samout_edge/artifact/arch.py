"""What an arch is: one spec every consumer asks, instead of checking names.

An arch is a mixer per layer (the token mixer: a running max, or causal softmax
attention), and each mixer says what state its layer carries from call to call:

- ``cummax``: ``past_max.{i}`` -> ``present_max.{i}``, ``[batch, heads, 1, head_dim]``,
  the running max so far; it never grows, and its values pass through Max, so a
  NaN in it must be caught on the host (a runtime's Max may drop it) and a graph
  unrolled for max_seq needs the length guard;
- ``softmax``: ``past_key_values.{i}.key|value`` -> ``present.{i}.key|value``,
  ``[batch, heads, past_seq, head_dim]`` as Optimum names them: the KV cache, which
  grows a token per token.

From that the spec answers: state names and shapes, the empty state, state bytes
at a context, whether any state grows (then memory bounds the context, and a
fixed-shape server state cannot hold it), and whether the graph needs the length
guard. A new arch is a new mixer here and in the model's layer factory.
"""

from __future__ import annotations

from dataclasses import dataclass

from samout_edge.errors import SamoutError


@dataclass(frozen=True)
class StateTensor:
    """One tensor of a layer's state, as the graph names it."""

    past: str  # the graph input
    present: str  # the graph output, the next call's past
    grows: bool  # its seq axis (2) holds every token so far (a KV cache); else it is 1
    running_max: bool  # its values pass through Max


def _cummax(i: int) -> list[StateTensor]:
    return [StateTensor(f"past_max.{i}", f"present_max.{i}", grows=False, running_max=True)]


def _softmax(i: int) -> list[StateTensor]:
    return [StateTensor(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}", grows=True, running_max=False)
            for kv in ("key", "value")]


MIXERS = {"cummax": _cummax, "softmax": _softmax}


@dataclass(frozen=True)
class ArchSpec:
    name: str
    mixer: str  # every layer's token mixer (MIXERS)

    def states(self, num_layers: int) -> list[StateTensor]:
        """Every state tensor in graph order: layer by layer."""
        return [t for i in range(num_layers) for t in MIXERS[self.mixer](i)]

    def layer_states(self, i: int) -> list[StateTensor]:
        return MIXERS[self.mixer](i)

    def past_names(self, num_layers: int) -> list[str]:
        return [t.past for t in self.states(num_layers)]

    def present_names(self, num_layers: int) -> list[str]:
        return [t.present for t in self.states(num_layers)]

    @property
    def grows(self) -> bool:
        """Whether the state grows with the context: memory bounds it, a fixed-shape state cannot hold it."""
        return any(t.grows for t in MIXERS[self.mixer](0))

    @property
    def guarded(self) -> bool:
        """Whether the graph scans the sequence with a scan unrolled for max_seq (the length guard, the NaN poison)."""
        return any(t.running_max for t in MIXERS[self.mixer](0))

    def state_shape(self, tensor: StateTensor, batch: int, heads: int, head_dim: int, past: int | str) -> list:
        """A state tensor's shape after ``past`` tokens (a name: a dynamic dimension)."""
        return [batch, heads, past if tensor.grows else 1, head_dim]

    def state_bytes(self, num_layers: int, heads: int, head_dim: int, batch: int, context: int, itemsize: int) -> int:
        per = batch * heads * head_dim * itemsize
        return sum(per * (context if t.grows else 1) for t in self.states(num_layers))

    def flatten(self, layer_states: list) -> list:
        """Per-layer states (a tensor, or a tuple of them) -> the flat list in graph order."""
        per_layer = len(MIXERS[self.mixer](0))
        return list(layer_states) if per_layer == 1 else [t for layer in layer_states for t in layer]

    def unflatten(self, flat: list) -> list:
        per_layer = len(MIXERS[self.mixer](0))
        return list(flat) if per_layer == 1 else [tuple(flat[i : i + per_layer]) for i in range(0, len(flat), per_layer)]


ARCHS: dict[str, ArchSpec] = {
    "cummax": ArchSpec("cummax", "cummax"),  # SamOut
    "softmax": ArchSpec("softmax", "softmax"),  # the baseline: the same weights, causal softmax attention
}


def arch_spec(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise SamoutError(f"unknown arch {name!r}; choose one of: {', '.join(ARCHS)}") from None
