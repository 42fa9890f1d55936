"""Model sizes: the seed article's configuration and a tiny one for tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from samout_edge.artifact.arch import ARCHS as ARCH_SPECS
from samout_edge.artifact.arch import arch_spec
from samout_edge.errors import SamoutError

ARCHS = tuple(ARCH_SPECS)  # the arch names, in order (artifact/arch.py holds what each one is)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_layers: int

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_heads", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SamoutError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise SamoutError(
                f"model config: heads ({self.num_heads}) must divide hidden size ({self.hidden_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        keys = ("vocab_size", "hidden_size", "num_heads", "num_layers")
        if not isinstance(data, dict):
            raise SamoutError(f"model config must be a JSON object, got {type(data).__name__}")
        missing = [k for k in keys if k not in data]
        if missing:
            raise SamoutError(f"model config is missing {', '.join(missing)}")
        return cls(**{k: data[k] for k in keys})

    def parameter_count(self) -> int:
        """Parameters of SamOut and of the softmax baseline alike (they share every weight)."""
        h, v = self.hidden_size, self.vocab_size
        per_layer = 3 * h * h + 3 * (h * h + h) + 2 * h + 1
        return v * h + self.num_layers * per_layer + h * v


PRESETS: dict[str, ModelConfig] = {
    # The seed article's setting: hidden 512, 8 heads, 6 layers, vocab 10000.
    "seed": ModelConfig(vocab_size=10000, hidden_size=512, num_heads=8, num_layers=6),
    # Small enough that a test exports and verifies it in about a second.
    "tiny": ModelConfig(vocab_size=128, hidden_size=32, num_heads=4, num_layers=2),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise SamoutError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def check_arch(arch: str) -> str:
    return arch_spec(arch).name
