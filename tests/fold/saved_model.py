"""A small folded model saved with nepenthe.save: the seed of the hostile-folder corpus and of the
load() fuzz (tests/fold/test_load_corpus.py, test_load_fuzz.py). Its recipe uses every part of the
format: registered modules, get_attr parameters, a constant (constants.pt), functions, methods and
an allow-listed getattr."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import nepenthe


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(3))
        self.register_buffer("mask", torch.tensor([1.0, 0.0, 1.0]), persistent=False)

    def forward(self, x):
        h = self.act(self.fc1(x))
        y = F.linear(h, self.fc2.weight, self.fc2.bias) * self.scale
        return (y * self.mask).view(y.shape[0], -1).sum(dim=-1, keepdim=True) + y


def make_saved(directory: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """(folder, input, expected output) of the folded Net saved into ``directory``."""
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(16, 6)
    folded = nepenthe.fold(model, nepenthe.measure(model, [x]), x, planner="all", verify=False)
    nepenthe.save(folded, directory)
    with torch.no_grad():
        return directory, x, folded(x)


def copy_saved(base: Path, directory: Path) -> Path:
    shutil.copytree(base, directory)
    return directory


def edit_recipe(directory: Path, edit) -> None:
    path = directory / "recipe.json"
    recipe = json.loads(path.read_text())
    edit(recipe)
    path.write_text(json.dumps(recipe))


def node(recipe: dict, name: str) -> dict:
    return next(n for n in recipe["nodes"] if n["name"] == name)
