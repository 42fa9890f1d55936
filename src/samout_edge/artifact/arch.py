"""What an arch is: one spec every consumer asks, instead of checking names.

An arch is a token mixer per layer, and each mixer says what state its layer
carries from call to call:

- ``cummax`` (SamOut): ``past_max.{i}`` -> ``present_max.{i}``, ``[batch, heads, 1, head_dim]``,
  the running max so far; its values pass through Max, so a NaN in it must be
  caught on the host (a runtime's Max may drop it) and a graph unrolled for
  max_seq needs the length guard;
- ``softmax`` (the baseline): ``past_key_values.{i}.key|value`` -> ``present.{i}.key|value``
  as Optimum names them, ``[batch, heads, past_seq, head_dim]``: the KV cache,
  which grows a token per token;
- ``hybrid`` (the seed article's next step): both, blended
  ``alpha * cummax + (1 - alpha) * softmax`` with a learned alpha per layer;
  its state is the running max and the KV cache;
- ``linear``: SamOut with the sequence cummax replaced by a gated linear recurrence
  ``h_t = a_t * h_{t-1} + (1 - a_t) * out_t``: ``past_linear.{i}`` -> ``present_linear.{i}``,
  ``[batch, heads, 1, head_dim]``, the last h (empty: zeros). A NaN in it propagates
  through the arithmetic in every runtime, so the host need not check it; the graph
  still needs the length guard (its scan is unrolled for max_seq too);
- ``ema``: the same with a learned, data-independent decay ``lam`` per head and channel
  (RetNet/S4D-style): ``past_ema.{i}`` -> ``present_ema.{i}``, as ``linear``'s.

A softmax window W (``softmax-w64``, ``hybrid-w64``) makes the attention see the
last W positions only; its cache is then W slots, a fixed ``[batch, heads, W, head_dim]``
that starts as zeros (positions before the first token are zero keys and values),
so the state is bounded and fixed in shape from the first token on.

A stack names one mixer per layer, comma-separated (``linear,softmax-w8``,
``cummax,cummax,softmax-w64,cummax``: Jamba/Griffin-style hybrids); layer i's state is
its own mixer's, named for i. A single name is that mixer in every layer, for any
layer count; a stack must name exactly the model's layers.

From that the spec answers: state names and shapes, the empty state (numpy arrays
by dtype; the torch model fills its tensors by the same rule, ``StateTensor.fill``),
state bytes at a context, the axis a state grows on (``SEQ_AXIS``) and how many
tokens a state holds, whether any state grows (then memory bounds the context, and a
fixed-shape server state cannot hold it), and whether the graph needs the length
guard: each state says which scan (scans.py) carries it, or none (a KV cache).
A hybrid export records its blend as a ``Blend`` (export.json's ``blend``).
A new arch is a new mixer here and in the model's layer factory.

The library passes the decoded ``ArchSpec``, never its name: ``arch_spec(name)`` is
called only where a name comes in (the CLI, export.json and engine.json on load, a
checkpoint's or a caller's ``--arch``), and ``spec.name`` is what goes back out.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from samout_edge.errors import SamoutError

SEQ_AXIS = 2  # every state tensor is [batch, heads, seq, head_dim]: a KV cache grows on this axis


@dataclass(frozen=True)
class StateTensor:
    """One tensor of a layer's state, as the graph names it: ``[batch, heads, slots, head_dim]``."""

    SEQ_AXIS: ClassVar[int] = SEQ_AXIS  # the axis of its slots, the one a KV cache grows on

    past: str  # the graph input
    present: str  # the graph output, the next call's past
    slots: int | None  # the length of its seq axis (SEQ_AXIS): fixed, or None for every token so far (a KV cache)
    scan: str | None  # the scan (scans.py) that carries it over the sequence: max, linear; None: a KV cache

    @property
    def grows(self) -> bool:
        return self.slots is None

    @property
    def running_max(self) -> bool:
        """Its values pass through Max: empty, it holds the dtype's lowest value (else zeros), and a
        runtime's Max may drop a NaN in it, so the host checks it is finite."""
        return self.scan == "max"

    def shape(self, batch: int | str, heads: int, head_dim: int, past: int | str) -> list:
        """Its shape after ``past`` tokens (a name: a dynamic dimension); fixed slots ignore ``past``."""
        shape: list = [batch, heads, head_dim]
        shape.insert(SEQ_AXIS, past if self.grows else self.slots)
        return shape

    def fill(self, lowest: float) -> float:
        """Its value before any token, given the dtype's lowest finite value: a running max holds
        that (not -inf, which some runtimes refuse as an input and fp16 kernels may mishandle),
        every other state zeros (an empty cache has no values; a window's slots and h start at 0).
        The one rule: numpy states (``empty``) and the torch model's (``torch.finfo``) both ask it."""
        return lowest if self.running_max else 0.0

    def empty_value(self, dtype: Any) -> float:
        """``fill`` for a numpy dtype (fp32, fp16; numpy has no bf16)."""
        return self.fill(float(np.finfo(np.dtype(dtype)).min))

    def empty(self, batch: int, heads: int, head_dim: int, dtype: Any) -> np.ndarray:
        """This tensor before any token, as a numpy array of ``dtype``."""
        return np.full(self.shape(batch, heads, head_dim, 0), self.empty_value(dtype), np.dtype(dtype))

    def length(self, value: Any) -> int:
        """Tokens it holds: the length of its seq axis (any array with a shape, or a shape)."""
        shape = value if isinstance(value, (tuple, list)) else np.shape(value)
        return int(shape[SEQ_AXIS])


def _running_max(i: int) -> list[StateTensor]:
    return [StateTensor(f"past_max.{i}", f"present_max.{i}", slots=1, scan="max")]


def _recurrent(name: str, i: int) -> list[StateTensor]:
    """The last h of a linear recurrence, ``past_{name}.{i}``: carried by the linear scan, zeros when empty."""
    return [StateTensor(f"past_{name}.{i}", f"present_{name}.{i}", slots=1, scan="linear")]


def _kv_cache(i: int, window: int) -> list[StateTensor]:
    return [StateTensor(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}", slots=window or None, scan=None)
            for kv in ("key", "value")]


@dataclass(frozen=True)
class Mixer:
    """A token mixer as every consumer but the model sees it: what it computes (inspect and
    --help print it), the state one layer of it carries, and whether it attends (a softmax
    window applies; a score per query and key)."""

    doc: str
    states: Callable[[int, int], list[StateTensor]]  # (layer i, window) -> the layer's state tensors, in graph order
    attends: bool = False


# A new mixer is an entry here and its class in models/model.py (MIXERS there, by the same name).
MIXERS: dict[str, Mixer] = {
    "cummax": Mixer("a running max over the sequence (SamOut)", lambda i, w: _running_max(i)),
    "softmax": Mixer("causal softmax attention", lambda i, w: _kv_cache(i, w), attends=True),
    "hybrid": Mixer("alpha * running max + (1 - alpha) * causal softmax attention, alpha learned per layer",
                    lambda i, w: _running_max(i) + _kv_cache(i, w), attends=True),
    "linear": Mixer("a gated linear recurrence over the sequence, h = a * h + (1 - a) * out, a = sigmoid(out1)",
                    lambda i, w: _recurrent("linear", i)),
    "ema": Mixer("an exponential moving average over the sequence, h = lam * h + (1 - lam) * out, "
                 "lam = sigmoid(decay_logit) learned per head and channel", lambda i, w: _recurrent("ema", i)),
}


@dataclass(frozen=True)
class LayerMixer:
    """One layer's token mixer (MIXERS) and, for softmax attention, its window (0: every position)."""

    mixer: str
    window: int = 0

    @property
    def attends(self) -> bool:
        return MIXERS[self.mixer].attends

    @property
    def doc(self) -> str:
        return MIXERS[self.mixer].doc + (f", softmax over the last {self.window} positions" if self.window else "")

    def states(self, i: int) -> list[StateTensor]:
        """Layer i's state tensors, named from this mixer."""
        return MIXERS[self.mixer].states(i, self.window)


@dataclass(frozen=True)
class ArchSpec:
    """An arch: one mixer for every layer (``cummax``), or a stack of one mixer per layer
    (``linear,softmax-w8``). Only a stack knows the layer count: it must match the model's."""

    name: str
    layers: tuple[LayerMixer, ...]  # one entry: every layer's mixer; more: layer i's, a stack

    @property
    def stack(self) -> bool:
        return len(self.layers) > 1

    def check_layers(self, num_layers: int) -> None:
        """A stack names exactly one mixer per layer."""
        if self.stack and len(self.layers) != num_layers:
            raise SamoutError(f"--arch {self.name} names {len(self.layers)} layers' mixers, "
                              f"the model has {num_layers} layers")

    def layer(self, i: int) -> LayerMixer:
        return self.layers[i if self.stack else 0]

    def layer_states(self, i: int) -> list[StateTensor]:
        return self.layer(i).states(i)

    def states(self, num_layers: int) -> list[StateTensor]:
        """Every state tensor in graph order: layer by layer."""
        return list(self._states(num_layers))

    @functools.lru_cache(maxsize=64)  # noqa: B019 (specs are few and live as long as the process): runner.run asks every call
    def _states(self, num_layers: int) -> tuple[StateTensor, ...]:
        self.check_layers(num_layers)
        return tuple(t for i in range(num_layers) for t in self.layer_states(i))

    def past_names(self, num_layers: int) -> list[str]:
        return [t.past for t in self.states(num_layers)]

    def present_names(self, num_layers: int) -> list[str]:
        return [t.present for t in self.states(num_layers)]

    @property
    def named_states(self) -> list[StateTensor]:
        """The states of the layers the spec names: layer 0 for one mixer, every layer for a stack."""
        return [t for i in range(len(self.layers)) for t in self.layer_states(i)]

    def has(self, mixer: str) -> bool:
        return any(layer.mixer == mixer for layer in self.layers)

    @property
    def attends(self) -> bool:
        """Whether a layer runs softmax attention (a score per query and key: memory per call)."""
        return any(layer.attends for layer in self.layers)

    @property
    def window(self) -> int:
        """The widest attention of a layer: 0 if one attends to every position, else its window."""
        windows = [layer.window for layer in self.layers if layer.attends]
        return 0 if not windows or 0 in windows else max(windows)

    @property
    def grows(self) -> bool:
        """Whether the state grows with the context: memory bounds it, a fixed-shape state cannot hold it."""
        return any(t.grows for t in self.named_states)

    @property
    def guarded(self) -> bool:
        """Whether the graph scans the sequence with a scan unrolled for max_seq (the length guard, the NaN poison)."""
        return any(t.scan for t in self.named_states)

    def state_shape(self, tensor: StateTensor, batch: int | str, heads: int, head_dim: int, past: int | str) -> list:
        """A state tensor's shape after ``past`` tokens (a name: a dynamic dimension)."""
        return tensor.shape(batch, heads, head_dim, past)

    def state_bytes(self, num_layers: int, heads: int, head_dim: int, batch: int, context: int, itemsize: int) -> int:
        per = batch * heads * head_dim * itemsize
        return sum(per * (context if t.grows else t.slots) for t in self.states(num_layers))

    def empty_state(self, num_layers: int, batch: int, heads: int, head_dim: int, dtype: Any) -> dict[str, np.ndarray]:
        """The state before any token, as numpy arrays of ``dtype`` keyed by graph input name: a
        running max at the dtype's lowest value, a KV cache of no tokens, a window and h of zeros."""
        return {t.past: t.empty(batch, heads, head_dim, dtype) for t in self.states(num_layers)}

    def past_length(self, num_layers: int, state: dict[str, Any]) -> int:
        """Tokens a growing state holds (0 for one that does not grow), read off its seq axis."""
        grown = [t for t in self.states(num_layers) if t.grows]
        return grown[0].length(state[grown[0].past]) if grown else 0

    def flatten(self, layer_states: list) -> list:
        """Per-layer states (a tensor, or a tuple of them) -> the flat list in graph order."""
        return [t for layer in layer_states for t in (layer if isinstance(layer, tuple) else (layer,))]

    def unflatten(self, flat: list) -> list:
        """The flat list in graph order -> per layer: a tensor where the layer has one, else a tuple."""
        out, at, i = [], 0, 0
        while at < len(flat):
            n = len(self.layer_states(i))
            out.append(flat[at] if n == 1 else tuple(flat[at : at + n]))
            at, i = at + n, i + 1
        return out


BLEND_SOURCES = ("learned", "stated")


@dataclass(frozen=True)
class Blend:
    """A hybrid export's blend ``alpha * cummax + (1 - alpha) * softmax``, as export.json's
    ``blend`` records it: ``alpha`` per layer (None in a layer that is not hybrid), learned with
    the checkpoint or ``stated`` (SamOut weights exported as a hybrid at ``export --hybrid-alpha``,
    which every PyTorch reference of the export must use again). Exports made before it was a
    field kept it in ``extra`` (alpha, alpha_from, hybrid_alpha): ``from_extra`` reads those."""

    alpha: tuple[float | None, ...]
    source: Literal["learned", "stated"]
    stated: float | None = None  # the --hybrid-alpha of a stated blend

    @classmethod
    def of(cls, alphas: list[float | None], learned: bool, stated: float | None = None) -> Blend:
        """What the exporter records: the model's per-layer alpha (rounded as recorded) and where
        it came from; a stated blend without a value is the default 0.5."""
        alpha = tuple(None if a is None else round(float(a), 6) for a in alphas)
        if learned:
            return cls(alpha, "learned")
        return cls(alpha, "stated", 0.5 if stated is None else float(stated))

    @property
    def stated_alpha(self) -> float | None:
        """The blend every PyTorch reference must be built with; None where the checkpoint has its own."""
        return self.stated if self.source == "stated" else None

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": list(self.alpha), "source": self.source, "stated": self.stated}

    @classmethod
    def from_dict(cls, data: Any) -> Blend | None:
        if data is None:
            return None
        if not isinstance(data, dict) or data.get("source") not in BLEND_SOURCES or not isinstance(data.get("alpha"), list):
            raise SamoutError(f"export.json: blend {data!r} is not a hybrid's blend (alpha per layer, source learned|stated)")
        stated = data.get("stated")
        if data["source"] == "stated" and not isinstance(stated, (int, float)):
            raise SamoutError(f"export.json: blend {data!r} is stated but gives no alpha")
        alpha = tuple(None if a is None else float(a) for a in data["alpha"])
        return cls(alpha, data["source"], None if stated is None else float(stated))

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> Blend | None:
        """An older export's blend, from the untyped ``extra`` it was kept in."""
        if not isinstance(extra, dict) or "alpha_from" not in extra:
            return None
        source = extra["alpha_from"]
        stated = extra.get("hybrid_alpha") if source == "stated" else None
        return cls.from_dict({"alpha": extra.get("alpha") or [], "source": source, "stated": stated})


def _single(name: str, mixer: str, window: int = 0) -> ArchSpec:
    return ArchSpec(name, (LayerMixer(mixer, window),))


ARCHS: dict[str, ArchSpec] = {name: _single(name, name) for name in MIXERS}  # one mixer in every layer
MAX_WINDOW = 1 << 20
MAX_LAYERS = 4096  # a stack longer than this is a typo, not a model
_WINDOWED = re.compile(r"(?P<base>[a-z]+)-w(?P<window>[0-9]+)")
_ATTENDING = [name for name, mixer in MIXERS.items() if mixer.attends]
NAMES_HELP = (f"choose one of: {', '.join(MIXERS)} ({' and '.join(_ATTENDING)} take a window: {_ATTENDING[0]}-w64), "
              "or one per layer, comma-separated: linear,softmax-w64")
ARCH_HELP = ("; ".join(f"{name}: {mixer.doc}" for name, mixer in MIXERS.items())
             + f". {' and '.join(_ATTENDING)} take a window ({_ATTENDING[0]}-w64); or one mixer per layer, "
             "comma-separated: linear,softmax-w64.")
ARCH_LIST_HELP = f"{', '.join(MIXERS)}, and {' / '.join(f'{n}-wN' for n in _ATTENDING)} for a softmax window of N"


def arch_name(base: str, window: int = 0) -> str:
    """The arch's full name: ``hybrid`` with a softmax window of 64 is ``hybrid-w64``."""
    spec = arch_spec(base)
    if window < 0 or window > MAX_WINDOW:
        raise SamoutError(f"--softmax-window must be between 0 (full attention) and {MAX_WINDOW:,}, got {window}")
    if window and spec.stack:
        raise SamoutError("--softmax-window applies to one mixer, not a stack: name each layer's window in --arch "
                          "(linear,softmax-w64)")
    if window and not spec.attends:
        raise SamoutError(f"--softmax-window applies to archs with softmax attention (softmax, hybrid), not {base}")
    if spec.window and window and spec.window != window:
        raise SamoutError(f"{base} already has a softmax window of {spec.window}; --softmax-window says {window}")
    return f"{spec.name.split('-w')[0]}-w{window}" if window else spec.name


def arch_spec(name: str) -> ArchSpec:
    """The spec of ``cummax``, ``softmax``, ``hybrid``, ``linear``, ``ema``, a windowed ``softmax-wN`` /
    ``hybrid-wN``, or a stack of them, one per layer: ``cummax,cummax,softmax-w64,cummax``.
    The one place a name is decoded (once per name: decoded specs are kept);
    ``arch_spec(spec.name) == spec``."""
    if not isinstance(name, str):
        raise SamoutError(f"an arch is a name, got {type(name).__name__}; {NAMES_HELP}")
    return _decode(name)


@functools.lru_cache(maxsize=256)
def _decode(name: str) -> ArchSpec:
    if "," not in name:
        return _one(name)
    parts = [part.strip() for part in name.split(",")]
    if len(parts) > MAX_LAYERS or not all(parts):
        raise SamoutError(f"arch {name!r} is not a list of mixers, one per layer; {NAMES_HELP}")
    layers = tuple(_one(part).layers[0] for part in parts)
    return ArchSpec(",".join(_one(part).name for part in parts), layers)


def _one(name: str) -> ArchSpec:
    """One mixer's spec: ``cummax`` ... or ``softmax-wN`` / ``hybrid-wN``."""
    if name in ARCHS:
        return ARCHS[name]
    match = _WINDOWED.fullmatch(name)
    if match and match["base"] in ARCHS and ARCHS[match["base"]].attends:
        window = int(match["window"])
        if 0 < window <= MAX_WINDOW and str(window) == match["window"]:
            return _single(name, ARCHS[match["base"]].layers[0].mixer, window)
    raise SamoutError(f"unknown arch {name!r}; {NAMES_HELP}")
