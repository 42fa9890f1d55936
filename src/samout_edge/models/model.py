"""SamOut as the seed article defines it, its softmax-attention baseline, their hybrid, and
SamOut with a gated linear recurrence.

Parameter names follow the seed code, so a state_dict saved from it loads with
``strict=True``. Every arch shares every parameter (the hybrid adds one per layer,
its blend); they differ only in how the sequence is mixed: a running maximum
(cummax), causal softmax attention, ``alpha * cummax + (1 - alpha) * softmax``, or a
gated linear recurrence (linear).

State makes prefill, chunked prefill and decode one computation:
- cummax: per layer the running max so far, ``[batch, heads, 1, head_dim]``;
  an empty past is the lowest finite value of the dtype.
- softmax: per layer the ``(key, value)`` cache, ``[batch, heads, past_seq, head_dim]``;
  with a window W, the last W keys and values, zeros before the first token.
- hybrid: ``(running max, key, value)``.
- linear: per layer the last h, ``[batch, heads, 1, head_dim]``; an empty past is zeros.
- ema: the same, of an exponential moving average with a learned decay per head and channel.

A stack (``linear,softmax-w8``) picks each layer's mixer, so each layer carries its own
mixer's state; the parameters keep their names whatever the mixer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from samout_edge.artifact.arch import ArchSpec, LayerMixer, arch_spec
from samout_edge.artifact.config import ModelConfig
from samout_edge.artifact.graph import dtype as graph_dtype
from samout_edge.models.ops import cummax, linear_scan


def torch_dtype(name: str) -> torch.dtype:
    """fp32 | fp16 | bf16 -> the torch dtype (one table: artifact.graph.DTYPES)."""
    return getattr(torch, graph_dtype(name).numpy)


CummaxState = torch.Tensor
KVState = tuple[torch.Tensor, torch.Tensor]
HybridState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
LinearState = torch.Tensor
LayerState = CummaxState | KVState | HybridState | LinearState


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[batch, seq, hidden] -> [batch, heads, seq, head_dim]"""
    b, s, _ = x.shape
    return x.view(b, s, num_heads, -1).permute(0, 2, 1, 3)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, head_dim] -> [batch, seq, hidden]"""
    b, _, s, _ = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, s, -1)


class MaxState(nn.Module):
    """The seed's token mixer: a running max over the sequence, then over the heads.

    ``fp32``: in an fp16 model, mix in fp32 (an fp32 island, set by the exporter where
    fp16 would overflow: exporter/precision.py); the projections and the state stay fp16.
    """

    fp32: bool = False
    # parameters SamOut's weights lack: loading those weights, the mixer keeps its own (deterministic) start
    initialised: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig, window: int = 0):
        super().__init__()
        self.num_heads = config.num_heads
        self.window = window  # softmax attends to the last `window` positions (0: all); unused by cummax
        self.combined = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, past: LayerState) -> tuple[torch.Tensor, LayerState]:
        out, out1, out2 = (split_heads(t, self.num_heads) for t in self.combined(x).chunk(3, -1))
        out, present = self.mix_sequence(out, out1, out2, past)
        score = cummax(out, dim=1)  # over the heads
        if self.fp32:
            score, out1, out2 = score.float(), out1.float(), out2.float()
        y = (score + out1) * out2 + out1
        return merge_heads(y), present

    def mix_sequence(self, out, out1, out2, past: CummaxState) -> tuple[torch.Tensor, CummaxState]:
        out = torch.maximum(past, cummax(out, dim=2))  # running max, carried across calls
        return out, out[:, :, -1:]


class CausalSelfAttention(MaxState):
    """The baseline: MaxState with the sequence cummax replaced by causal softmax
    attention over q=out, k=out1, v=out2 (same parameters, same count)."""

    def mix_sequence(self, out, out1, out2, past: KVState) -> tuple[torch.Tensor, KVState]:
        key = torch.cat([past[0], out1], dim=2)
        value = torch.cat([past[1], out2], dim=2)
        if self.window:  # the cache keeps the last `window` positions: a fixed shape
            present = (key[:, :, -self.window :], value[:, :, -self.window :])
        else:
            present = (key, value)
        if self.fp32:  # the scores in fp32; the cache stays in the model's dtype
            out, key, value = out.float(), key.float(), value.float()
        return causal_attention(out, key, value, self.window), present


class HybridMixer(CausalSelfAttention):
    """The seed article's next step: ``alpha * cummax + (1 - alpha) * softmax`` of the same
    projections, then the heads' running max as in SamOut. ``alpha = sigmoid(alpha_logit)``
    is learned per layer (0.5 at initialisation)."""

    def __init__(self, config: ModelConfig, window: int = 0):
        super().__init__(config, window)
        self.alpha_logit = nn.Parameter(torch.zeros(()))

    def mix_sequence(self, out, out1, out2, past: HybridState) -> tuple[torch.Tensor, HybridState]:
        running, present_max = MaxState.mix_sequence(self, out, out1, out2, past[0])
        attended, present_kv = CausalSelfAttention.mix_sequence(self, out, out1, out2, past[1:])
        alpha = torch.sigmoid(self.alpha_logit).to(attended.dtype)
        return alpha * running + (1 - alpha) * attended, (present_max, *present_kv)


class LinearRecurrence(MaxState):
    """SamOut with the sequence cummax replaced by a gated linear recurrence of the same
    projections (same parameters, same count), per head and channel::

        a_t = sigmoid(out1_t)                          # a data-dependent decay in (0, 1)
        h_t = a_t * h_{t-1} + (1 - a_t) * out_t        # h_{-1}: the past (zeros when empty)
        score = cummax(h, dim=heads);  y = (score + out1) * out2 + out1    # as SamOut

    h is a convex blend of the past and out_t, so it stays within their range: no
    overflow in fp16. The state is the last h. In an fp32 island the recurrence runs
    in fp32 and the state stays in the model's dtype."""

    def mix_sequence(self, out, out1, out2, past: LinearState) -> tuple[torch.Tensor, LinearState]:
        dtype = past.dtype
        if self.fp32:
            out, out1, past = out.float(), out1.float(), past.float()
        a = torch.sigmoid(out1)
        h = linear_scan(a, (1 - a) * out, past)
        return h, h[:, :, -1:].to(dtype)


class ExponentialMovingAverage(MaxState):
    """SamOut with the sequence cummax replaced by an exponential moving average with a learned,
    data-independent decay per head and channel (RetNet/S4D-style), of the same projections::

        lam = sigmoid(decay_logit)                     # [heads, 1, head_dim], in (0, 1); not a function of x
        h_t = lam * h_{t-1} + (1 - lam) * out_t        # h_{-1}: the past (zeros when empty)
        score = cummax(h, dim=heads);  y = (score + out1) * out2 + out1    # as SamOut

    It is LinearRecurrence with ``a_t = lam`` for every token: the same ``linear`` scan
    (``linear_scan`` with ``a = lam`` expanded to out's shape), the same state, the last h.
    ``decay_logit`` is the one parameter SamOut's weights lack: it starts (``initialised``,
    the same at every load) with lam spread evenly over [0.85, 0.95] across heads and
    channels, around 0.9. h is a convex blend of the past and out_t: no fp16 overflow. In an
    fp32 island the average runs in fp32 and the state stays in the model's dtype."""

    initialised = ("decay_logit",)

    def __init__(self, config: ModelConfig, window: int = 0):
        super().__init__(config, window)
        n = config.num_heads * config.head_dim
        # in Python floats: built with torch.logit, two loads in one test process differed in the last bits,
        # and every load must be the same model (the export's reference, the torch runner)
        lam = [0.85 + 0.1 * k / max(1, n - 1) for k in range(n)]
        logits = torch.tensor([math.log(p / (1 - p)) for p in lam])
        self.decay_logit = nn.Parameter(logits.view(config.num_heads, 1, config.head_dim))

    def mix_sequence(self, out, out1, out2, past: LinearState) -> tuple[torch.Tensor, LinearState]:
        dtype = past.dtype
        if self.fp32:
            out, past = out.float(), past.float()
        lam = torch.sigmoid(self.decay_logit.to(out.dtype)).expand_as(out)
        h = linear_scan(lam, (1 - lam) * out, past)
        return h, h[:, :, -1:].to(dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = 0) -> torch.Tensor:
    """Scaled dot-product attention where query i sits at position past_seq + i and sees
    the keys at or before it: all of them, or the last ``window`` positions.

    Eager calls take the fused kernels' fast paths (no past: is_causal; one query:
    no mask) and split a long windowed call into blocks of queries, each with only
    the keys its window reaches. An exported graph must serve every shape, so it
    always builds the mask. In fp32 it writes the softmax so that no exp lands
    below fp32's normal range: x86's exp is an order of magnitude slower on
    denormals, and a masked key's exp(-inf - max) computes through them (ONNX
    Runtime's Softmax over a 256 x 320 window: 2.8 ms masked, 0.25 ms not). Each
    score is raised to at least max - 80 and the masked weights are zeroed after:
    the weights an unclamped softmax gives, to e^-80 relative. (fp16 graphs are
    for GPUs, where denormals cost nothing, and OpenVINO's CPU plugin computes
    this form of an fp16 graph wrongly: they keep the plain masked softmax.)
    """
    seq, total = q.shape[2], k.shape[2]
    if not torch.compiler.is_exporting():
        if not window and seq == total:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if seq == 1:  # the newest query sees the last `window` keys, or all of them
            return F.scaled_dot_product_attention(q, k[:, :, -window:], v[:, :, -window:])
        if window and seq > 2 * window:  # block by block: memory linear in seq, not quadratic
            past, block = total - seq, window
            outs = []
            for start in range(0, seq, block):
                stop = min(seq, start + block)
                first = max(0, past + start - window + 1)  # the oldest key the block's first query sees
                outs.append(causal_attention(q[:, :, start:stop], k[:, :, first : past + stop],
                                             v[:, :, first : past + stop], window))
            return torch.cat(outs, dim=2)
    key_pos = torch.arange(total, device=q.device)
    query_pos = torch.arange(seq, device=q.device) + (total - seq)
    mask = key_pos[None, :] <= query_pos[:, None]
    if window:
        mask = mask & (key_pos[None, :] > query_pos[:, None] - window)
    if not torch.compiler.is_exporting() or q.dtype != torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # the lowest float where masked, added once per call (a Where per layer and head took twice the time)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias
    scores = torch.maximum(scores, scores.amax(-1, keepdim=True) - 80.0)  # exp(score - max) >= e^-80
    return (scores.softmax(-1) * mask.to(q.dtype)) @ v


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in x's dtype: an fp32 island of an fp16 model casts the weights up.
    ``layer.input_hook`` (set by models/quantize.py, which hooks the layers called as
    modules the same way; never on a model being exported) sees x first: it quantizes x
    as an int8-activation kernel does, or records it to calibrate GPTQ."""
    hook = getattr(layer, "input_hook", None)
    if hook is not None:
        x = hook(x)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


class FeedForward(nn.Module):
    """The seed's gated FFN: ffn2(ffn1(x) * relu(gate(x))), in the dtype of its input."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.ffn1 = nn.Linear(hidden_size, hidden_size)
        self.ffn2 = nn.Linear(hidden_size, hidden_size)
        self.gate = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.ffn2, linear(self.ffn1, x) * F.relu(linear(self.gate, x)))


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weights' dtype.

    Its sum of squares overflows fp16; TensorRT 11 takes precision from the graph,
    so the fp32 islands must be in the graph itself. A no-op for fp32 models.
    ``decompose`` writes it as mean/variance ops, for graphs that TensorRT 8.5
    (no LayerNormalization op) must parse.
    """

    decompose: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, b = x.float(), self.weight.float(), self.bias.float()  # no-ops in an fp32 model
        if self.decompose:
            # sum / n rather than mean: ReduceSum takes its axes the same way in opsets 13-18
            n = 1.0 / h.shape[-1]
            mean = h.sum(-1, keepdim=True) * n
            var = (h - mean).pow(2).sum(-1, keepdim=True) * n
            return ((h - mean) / torch.sqrt(var + self.eps) * w + b).to(x.dtype)
        return F.layer_norm(h, self.normalized_shape, w, b, self.eps).to(x.dtype)


# artifact/arch.py's mixers
MIXERS = {"cummax": MaxState, "softmax": CausalSelfAttention, "hybrid": HybridMixer, "linear": LinearRecurrence,
          "ema": ExponentialMovingAverage}


class DecoderLayer(nn.Module):
    """``fp32``: in an fp16 model, the FFN, the blend and LayerNorm's input in fp32
    (an fp32 island, set by the exporter where fp16 would overflow); the output is
    the model's dtype again."""

    fp32: bool = False

    def __init__(self, config: ModelConfig, mixer: LayerMixer):
        super().__init__()
        self.self_attention = MIXERS[mixer.mixer](config, mixer.window)  # this layer's token mixer
        self.ffn = FeedForward(config.hidden_size)
        self.layer_norm = LayerNorm(config.hidden_size)
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor, past: LayerState) -> tuple[torch.Tensor, LayerState]:
        x1, present = self.self_attention(x, past)
        dtype = torch.float32 if self.fp32 else x.dtype
        alpha, h = self.alpha.to(dtype), x.to(dtype)
        return self.layer_norm(alpha * self.ffn(x1.to(dtype)) + (1 - alpha) * h).to(x.dtype), present


class SamOut(nn.Module):
    """The language model; ``arch="softmax"`` gives the baseline with the same weights,
    ``"hybrid"`` the blend of both, ``"hybrid-w64"`` with a softmax window of 64, ``"linear"`` the
    gated linear recurrence, ``"linear,softmax-w8"`` one mixer per layer (artifact/arch.py).
    ``arch``: the spec, or a name a caller gave (decoded here, once); ``spec`` is what the
    library passes on, ``arch`` its name."""

    def __init__(self, config: ModelConfig, arch: ArchSpec | str = "cummax"):
        super().__init__()
        self.config = config
        self.spec = spec = arch if isinstance(arch, ArchSpec) else arch_spec(arch)
        self.arch = spec.name
        spec.check_layers(config.num_layers)
        self.em = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.decoder_layers = nn.ModuleList(DecoderLayer(config, spec.layer(i)) for i in range(config.num_layers))
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def empty_state(self, batch: int) -> list[LayerState]:
        """The state before any token: lowest-value running max, an empty KV cache, a window
        of zeros, a zero h (artifact/arch.py)."""
        c, p, spec = self.config, self.head.weight, self.spec
        lowest = torch.finfo(p.dtype).min  # the spec's rule (StateTensor.fill) in the model's dtype, bf16 too
        flat = [p.new_full(t.shape(batch, c.num_heads, c.head_dim, 0), t.fill(lowest)) for t in spec.states(c.num_layers)]
        return spec.unflatten(flat)

    def forward(
        self,
        input_ids: torch.Tensor,
        past: list[LayerState] | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, list[LayerState]]:
        if past is None:
            past = self.empty_state(input_ids.shape[0])
        x = self.em(input_ids)
        present = []
        for layer, layer_past in zip(self.decoder_layers, past):
            y, layer_present = layer(x, layer_past)
            x = y + x
            present.append(layer_present)
        if last_only:
            x = x[:, -1:]
        return self.head(x), present
