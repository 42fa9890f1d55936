"""SamOut written the way the seed article's code is laid out (class and parameter
names, the math step by step), independently of samout_edge.models: a state_dict
saved from it must load into samout_edge's SamOut with strict=True and give the
same logits."""

import torch
from torch import nn


class MaxState(nn.Module):
    def __init__(self, hidden_dim, heads):
        super().__init__()
        assert hidden_dim % heads == 0
        self.head_size = hidden_dim // heads
        self.head_num = heads
        self.hidden_dim = hidden_dim
        self.combined = nn.Linear(hidden_dim, 3 * hidden_dim, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        combined = self.combined(x)
        out, out1, out2 = torch.split(combined, d, dim=-1)
        out = out.view(b, s, self.head_num, self.head_size).permute(0, 2, 1, 3)
        out1 = out1.view(b, s, self.head_num, self.head_size).permute(0, 2, 1, 3)
        out2 = out2.view(b, s, self.head_num, self.head_size).permute(0, 2, 1, 3)
        out = torch.cummax(out, dim=2)[0]
        out_score = torch.cummax(out, dim=1)[0]
        out = (out_score + out1) * out2 + out1
        out = out.permute(0, 2, 1, 3).contiguous().view(b, s, d)
        return out


class FeedForward(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.ffn1 = nn.Linear(hidden_size, hidden_size)
        self.ffn2 = nn.Linear(hidden_size, hidden_size)
        self.gate = nn.Linear(hidden_size, hidden_size)
        self.relu = nn.ReLU()

    def forward(self, x):
        x1 = self.ffn1(x)
        x2 = self.relu(self.gate(x))
        return self.ffn2(x1 * x2)


class DecoderLayer(nn.Module):
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.self_attention = MaxState(hidden_size, num_heads)
        self.ffn = FeedForward(hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size)
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        x1 = self.self_attention(x)
        x = self.layer_norm(self.alpha * self.ffn(x1) + (1 - self.alpha) * x)
        return x


class SamOut(nn.Module):
    def __init__(self, voc_size, hidden_size, num_heads, num_layers):
        super().__init__()
        self.em = nn.Embedding(voc_size, hidden_size, padding_idx=0)
        self.decoder_layers = nn.ModuleList([DecoderLayer(hidden_size, num_heads) for _ in range(num_layers)])
        self.head = nn.Linear(hidden_size, voc_size, bias=False)

    def forward(self, x):
        x = self.em(x)
        for decoder_layer in self.decoder_layers:
            x = decoder_layer(x) + x
        return self.head(x)
