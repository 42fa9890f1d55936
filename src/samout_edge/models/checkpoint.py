"""Checkpoints: our directory format, and bare state_dicts saved from the seed code.

- directory: ``config.json`` (model sizes) + ``model.safetensors``
- file (.pt/.pth/.bin): a ``torch.save``d state_dict with the seed's parameter
  names, loaded with ``weights_only=True``; sizes come from the tensors, the head
  count (which no tensor shows) from ``heads``.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from samout_edge.artifact.arch import ArchSpec, arch_spec
from samout_edge.artifact.config import ModelConfig
from samout_edge.artifact.files import make_readable, read_json, sha256_file, staging_dir, write_json_atomic
from samout_edge.artifact.manifest import Manifest
from samout_edge.artifact.resources import check_memory
from samout_edge.errors import SamoutError
from samout_edge.models.model import MIXERS, SamOut

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_SHA256 = "weights_sha256"  # in config.json: what we wrote, so only that is ever replaced
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")
ALPHA_LOGIT = "alpha_logit"  # a hybrid's blend, per layer: decoder_layers.N.self_attention.alpha_logit
DEFAULT_HEADS = 8

StateDict = dict[str, torch.Tensor]


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: StateDict
    path: Path  # what the user named: a directory or a file
    weights_path: Path  # the file holding the tensors
    sha256: str  # of weights_path

    @property
    def alphas(self) -> list[float | None] | None:
        """A hybrid layer's learned blend, ``sigmoid(alpha_logit)``, per layer (None in a layer
        without one: a stack's other mixers); None for weights with no blend at all (SamOut's)."""
        keys = [blend_key(i) for i in range(self.config.num_layers)]
        alphas = [torch.sigmoid(self.state_dict[k]).item() if k in self.state_dict else None for k in keys]
        return None if all(a is None for a in alphas) else alphas

    def model(self, arch: ArchSpec | str = "cummax", dtype: torch.dtype = torch.float32,
              alpha: float | None = None) -> SamOut:
        """The checkpoint as ``arch`` (the spec, or the name a user gave: ``--arch``). SamOut's
        weights load into any arch, their hybrid layers blended at ``alpha`` (0.5 unless given);
        a learned blend needs a hybrid layer where it was learned, and only there."""
        spec = arch if isinstance(arch, ArchSpec) else arch_spec(arch)
        spec.check_layers(self.config.num_layers)
        layers = range(self.config.num_layers)
        hybrid = [i for i in layers if spec.layer(i).mixer == "hybrid"]
        learned = [i for i, a in enumerate(self.alphas or []) if a is not None]
        if learned and learned != hybrid:
            where = "use --arch hybrid" if len(learned) == self.config.num_layers else "--arch must make those layers hybrid"
            raise SamoutError(f"{self.path} is a hybrid's checkpoint (it has a learned alpha in layers "
                              f"{', '.join(map(str, learned))}): {where}, and no others")
        if alpha is not None and not (hybrid and not learned):
            raise SamoutError("--hybrid-alpha sets the blend of SamOut weights loaded into a hybrid; "
                              + ("this checkpoint has its own, learned" if learned else f"--arch is {spec.name}"))
        state = dict(self.state_dict)
        if hybrid and not learned:
            start = 0.5 if alpha is None else alpha
            if not 0.0 < start < 1.0:
                raise SamoutError(f"--hybrid-alpha must be between 0 and 1 (exclusive), got {start}")
            for i in hybrid:
                state[blend_key(i)] = torch.logit(torch.tensor(start))
        model = SamOut(self.config, spec)
        for i, layer in enumerate(model.decoder_layers):  # a mixer's own parameters SamOut's weights lack: its start
            for name in layer.self_attention.initialised:
                state.setdefault(f"decoder_layers.{i}.self_attention.{name}", getattr(layer.self_attention, name).detach())
        own = model.state_dict()
        foreign = [k for k in state if k not in own]
        if foreign:
            raise SamoutError(f"{self.path} has parameters --arch {spec.name} lacks ({', '.join(foreign[:2])}"
                              f"{', ...' if len(foreign) > 2 else ''}): those layers were trained with another mixer")
        model.load_state_dict(state, strict=True)
        return model.to(dtype).eval()


def blend_key(i: int) -> str:
    """Layer i's hybrid blend in a state_dict."""
    return f"decoder_layers.{i}.self_attention.{ALPHA_LOGIT}"


def previous_checkpoint_files(directory: Path) -> dict[str, str | None] | None:
    """The files an earlier checkpoint of ours at ``directory`` holds, with the weights'
    recorded sha256; None if it is not ours. Weights without a record (checkpoints
    written before it) are never removed: a replace then stops, naming them."""
    try:
        data = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != "samout-edge":
        return None
    digest = data.get(WEIGHTS_SHA256)
    return {CONFIG_FILE: None, **({WEIGHTS_FILE: digest} if isinstance(digest, str) else {})}


def save_checkpoint(model: SamOut, directory: str | Path, force: bool = False) -> Path:
    """Write ``model`` as a checkpoint directory, atomically; an earlier checkpoint
    of ours is replaced, anything else refused unless ``force`` (which removes nothing)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with staging_dir(directory, previous_checkpoint_files, force) as stage:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(stage / WEIGHTS_FILE))
        make_readable(stage / WEIGHTS_FILE)
        config = {"format": "samout-edge", **model.config.to_dict(), WEIGHTS_SHA256: sha256_file(stage / WEIGHTS_FILE)}
        write_json_atomic(stage / CONFIG_FILE, config)
    return directory


def load_checkpoint(path: str | Path, heads: int | None = None) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise SamoutError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _load_directory(path, heads)
    return _load_state_dict_file(path, heads)


def _load_directory(path: Path, heads: int | None) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / WEIGHTS_FILE
    if not (path / CONFIG_FILE).is_file() or not weights.is_file():
        raise SamoutError(
            f"{path} is not a checkpoint directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    config = ModelConfig.from_dict(read_json(path / CONFIG_FILE, "checkpoint config"))
    if heads is not None and heads != config.num_heads:
        raise SamoutError(f"--heads {heads} contradicts {path / CONFIG_FILE} (num_heads {config.num_heads})")
    # Sizes first, so an edited config.json (a million layers) fails in one line, not after building the model.
    count, size = config.parameter_count(), weights.stat().st_size
    if not count * 2 <= size <= count * 8 + (16 << 20):
        raise SamoutError(f"{path / CONFIG_FILE} describes {count:,} parameters, but {WEIGHTS_FILE} holds "
                          f"{size:,} bytes: the two do not belong together")
    check_memory(size * 3, f"loading {path}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise SamoutError(f"cannot read {weights}: {e}") from None
    return Checkpoint(config, check_state_dict(state, config), path, weights, sha256_file(weights))


def _load_state_dict_file(path: Path, heads: int | None) -> Checkpoint:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warnings advise unsafe loading; we never do it
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SamoutError(f"cannot read checkpoint {path}: it holds Python objects besides tensors, which "
                          "samout-edge never unpickles; save the model's state_dict() alone") from None
    except Exception as e:  # torch raises many types for truncated or foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SamoutError(
            f"cannot read checkpoint {path}: not a PyTorch state_dict file, or truncated ({reason[:200]})"
        ) from None
    state = _unwrap_state_dict(obj, path)
    config = infer_config(state, heads if heads is not None else DEFAULT_HEADS, path)
    return Checkpoint(config, check_state_dict(state, config), path, path, sha256_file(path))


def _unwrap_state_dict(obj: object, path: Path) -> StateDict:
    """Accept a bare state_dict or the usual {'state_dict': ...} / {'model': ...} wrappers."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise SamoutError(f"{path} does not hold a state_dict (a dict of tensors)")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise SamoutError(f"{path}: entry {not_tensors[0]!r} is not a tensor; expected a state_dict")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def infer_config(state: StateDict, heads: int, path: Path | str = "checkpoint") -> ModelConfig:
    """Read vocab, hidden and layer count off the tensors; heads must be given."""
    em = state.get("em.weight")
    if em is None or em.dim() != 2:
        raise SamoutError(f"{path}: no 2-D 'em.weight' tensor; keys are not SamOut's (first: {next(iter(state))!r})")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"decoder_layers\.(\d+)\.", k))}
    if not layers:
        raise SamoutError(f"{path}: no 'decoder_layers.N.*' tensors; keys are not SamOut's")
    vocab, hidden = em.shape
    if heads < 1 or hidden % heads:
        raise SamoutError(f"--heads {heads} does not divide the checkpoint's hidden size {hidden}")
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, num_heads=heads, num_layers=max(layers) + 1)


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = SamOut(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def own_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Every layer's shape of each mixer's own parameters (``initialised``: SamOut's weights lack them)."""
    shapes = {}
    with torch.device("meta"):
        for name, mixer in MIXERS.items():
            if mixer.initialised:
                shapes |= {k: v.shape for k, v in SamOut(config, name).state_dict().items()
                           if k.rpartition(".")[2] in mixer.initialised}
    return shapes


def check_state_dict(state: StateDict, config: ModelConfig) -> StateDict:
    """Check names and shapes against SamOut (a hybrid's: plus its hybrid layers' blends; a layer
    trained with a mixer of its own parameters: plus those); name the first differences."""
    expected = expected_shapes(config)
    expected |= {blend_key(i): torch.Size([]) for i in range(config.num_layers) if blend_key(i) in state}
    expected |= {k: shape for k, shape in own_shapes(config).items() if k in state}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:3])}" + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else "")
            )
        raise SamoutError(f"checkpoint keys are not SamOut's: {'; '.join(parts)}")
    fixed = {}
    for key, shape in expected.items():
        tensor = state[key]
        if key.endswith(".alpha") and tensor.numel() == 1:
            tensor = tensor.reshape(shape)  # some seed versions save alpha as shape [1]
        if tensor.shape != shape:
            raise SamoutError(
                f"checkpoint tensor {key} has shape {list(tensor.shape)}, SamOut with "
                f"{config.num_heads} heads expects {list(shape)}"
            )
        if not tensor.is_floating_point():
            raise SamoutError(f"checkpoint tensor {key} has dtype {tensor.dtype}; expected floating point")
        fixed[key] = tensor.float()
    return fixed


def random_checkpoint(config: ModelConfig, seed: int = 0) -> SamOut:
    """A randomly initialised model, reproducible from ``seed``."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return SamOut(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)



COPY_HINT = "pass --checkpoint PATH to use a copy of it"


def source_checkpoint(directory: Path, manifest: Manifest, override: str | Path | None,
                      hint: str = COPY_HINT) -> Checkpoint:
    """The checkpoint an export came from, checked against the recorded sha256.
    ``hint``: how the command at hand takes a copy of it, for the one-line error."""
    src = manifest.source
    path = Path(override) if override else Path(src["path"])
    if not path.is_absolute() and not override:
        path = directory / path
    if not path.exists():
        raise SamoutError(f"the source checkpoint {path} is not here; {hint}")
    ckpt = load_checkpoint(path, None if path.is_dir() else manifest.config.num_heads)
    if ckpt.sha256 != src.get("sha256"):
        raise SamoutError(f"checkpoint {path} does not match the one exported (sha256 differs)")
    if ckpt.config != manifest.config:
        raise SamoutError(f"checkpoint {path} has config {ckpt.config.to_dict()}, the export {manifest.config.to_dict()}")
    return ckpt
