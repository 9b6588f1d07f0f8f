"""torch.compiler.nested_compile_region: wrong gradients with Inductor on the CPU in fp32 (torch 2.13).

An embedding, two layers `x + a(x * w)` whose forward is a nested compile region, `x * w` and a
linear head with cross-entropy. The second layer's `w` gets a gradient 66% off the eager model's
(relative norm of the difference); backend="aot_eager" agrees with eager, and so do torch 2.11 and
Inductor with `allow_buffer_reuse=False` (the workaround in `regions.py`, beside this script).
Without the embedding (a float input), or without the `* w` after the layers, the gradients agree.
    python reports/bench/gpu/nested_region_grad_bug.py
"""
import copy

import torch
from torch import nn


class Layer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.ones(dim))
        self.a = nn.Linear(dim, dim, bias=False)

    @torch.compiler.nested_compile_region
    def forward(self, x):
        return x + self.a(x * self.w)


class Model(nn.Module):
    def __init__(self, dim=64, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Layer(dim), Layer(dim)])
        self.w = nn.Parameter(torch.ones(dim))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, targets):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return nn.functional.cross_entropy(self.head(x * self.w), targets)


torch.manual_seed(0)
model = Model()
eager = copy.deepcopy(model)
ids, targets = torch.randint(0, 50, (64,)), torch.randint(0, 50, (64,))
torch.compile(model)(ids, targets).backward()
eager(ids, targets).backward()
print(torch.__version__)
for (name, p), q in zip(model.named_parameters(), eager.parameters()):
    print(f"{name:16s} relative gradient error {((p.grad - q.grad).norm() / q.grad.norm()).item():.1e}")
