"""The forks' low-rank corrections (lib_pg/hosts/common/fork_loras.py), host-free: which patch
entries count as plain LoRAs, that a correction equals the forks' merged delta applied to the
input (Forge backend/patcher/lora.py merge_lora_to_weight, reForge
ldm_patched/modules/weight_adapter/lora.py calculate_weight: `(strength * alpha / rank) *
(up.flatten(1) @ down.flatten(1)).reshape(weight.shape)`), and which layers keep the copy path.
The end-to-end checks against the fake forks are in tests/fork_lora_checks.py."""

import pytest
import torch
import torch.nn.functional as F

from lib_pg.hosts.common.fork_loras import PatcherLoras, lora_correction, low_rank_corrections, plain_lora

TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # as tests/test_lora_mode.py: another float order than the merge


class LoRAAdapter:  # reForge's weight adapter, as far as PG reads it (name, weights)
    name = "lora"

    def __init__(self, weights):
        self.weights = weights


class Linear(torch.nn.Module):  # Forge's ForgeOperations.Linear: an nn.Module, not an nn.Linear
    def __init__(self, i, o):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(o, i))
        self.bias = torch.nn.Parameter(torch.randn(o))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def forge_entry(up, down, alpha=None, strength=1.0, mid=None, dora=None, strength_model=1.0, offset=None, function=None):
    return [strength, ("lora", (up, down, alpha, mid, dora)), strength_model, offset, function]


def reforge_entry(up, down, alpha=None, strength=1.0, reshape=None):
    return (strength, LoRAAdapter((up, down, alpha, None, None, reshape)), 1.0, None, None)


def merged_delta(weight, strength, up, down, alpha):
    alpha = alpha / down.shape[0] if alpha is not None else 1.0
    return ((strength * alpha) * torch.mm(up.flatten(1).float(), down.flatten(1).float())).reshape(weight.shape)


def test_plain_lora_entries():
    up, down = torch.randn(8, 2), torch.randn(2, 6)
    assert plain_lora(forge_entry(up, down, 2.0, 0.7))[0] == 0.7
    assert plain_lora(reforge_entry(up, down, torch.tensor(2.0)))[3] == 2.0
    assert plain_lora((0.5, ("lora", (up, down, None, None, None, None)), 1.0, None, None)) is not None
    for entry in (forge_entry(up, down, mid=torch.randn(2, 2, 3, 3)), forge_entry(up, down, dora=torch.ones(8, 1)),
                  forge_entry(up, down, strength_model=0.5), forge_entry(up, down, offset=(0, 0, 4)),
                  forge_entry(up, down, function=lambda a: a), reforge_entry(up, down, reshape=[8, 6]),
                  [1.0, ("loha", (up, down, None, up, down, None, None, None)), 1.0, None, None],
                  [1.0, ("diff", (torch.randn(8, 6),)), 1.0, None, None]):
        assert plain_lora(entry) is None


@pytest.mark.parametrize("form", ["linear", "forge_linear", "conv3x3", "conv1x1_2d_factors"])
def test_correction_is_the_merged_delta(form):
    g = torch.Generator().manual_seed(0)
    if form == "linear":
        module, up, down = torch.nn.Linear(12, 10), torch.randn(10, 3, generator=g), torch.randn(3, 12, generator=g)
        x = torch.randn(4, 7, 12, generator=g)
    elif form == "forge_linear":
        module, up, down = Linear(12, 10), torch.randn(10, 3, generator=g), torch.randn(3, 12, generator=g)
        x = torch.randn(5, 12, generator=g)
    elif form == "conv3x3":
        module = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)
        up, down = torch.randn(8, 3, 1, 1, generator=g), torch.randn(3, 6, 3, 3, generator=g)
        x = torch.randn(2, 6, 9, 9, generator=g)
    else:  # SD 1.5's proj_in/proj_out: 1×1 convs, LoRA factors stored as Linear ones
        module, up, down = torch.nn.Conv2d(6, 8, 1), torch.randn(8, 3, generator=g), torch.randn(3, 6, generator=g)
        x = torch.randn(2, 6, 5, 5, generator=g)
    delta = lora_correction(module, module.weight, 0.8, up, down, 2.0)
    merged = merged_delta(module.weight, 0.8, up, down, 2.0)
    with torch.no_grad():
        if module.weight.dim() == 4:
            expected = F.conv2d(x, merged, None, module.stride, module.padding, module.dilation)
        else:
            expected = F.linear(x, merged)
        torch.testing.assert_close(delta.output(x), expected, **TOLERANCE)
    torch.testing.assert_close(delta.weight(), merged)
    assert delta.nbytes == delta.held_bytes == (up.numel() + down.numel()) * 4


def test_forms_without_a_low_rank_correction():
    g = torch.Generator().manual_seed(0)
    grouped = torch.nn.Conv2d(8, 8, 3, groups=2)
    assert lora_correction(grouped, grouped.weight, 1.0, torch.randn(8, 2, 1, 1), torch.randn(2, 4, 3, 3), None) is None
    conv = torch.nn.Conv2d(6, 8, 3)
    assert lora_correction(conv, conv.weight, 1.0, torch.randn(8, 2, 3, 3, generator=g), torch.randn(2, 6, 1, 1), None) is None
    norm = torch.nn.LayerNorm(8)
    assert lora_correction(norm, norm.weight, 1.0, torch.randn(8, 1), torch.randn(1, 1), None) is None


class View(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = torch.nn.Module()
        for name in ("a", "b", "c", "d", "e"):
            setattr(self.model.diffusion_model, name, torch.nn.Linear(6, 6))


def test_which_layers_get_corrections():
    """Only a layer whose weight is its only patched parameter, whose entries are all additive, and
    whose stripped entries are all plain LoRAs."""
    view = View()
    up, down = torch.randn(6, 2), torch.randn(2, 6)
    kept_lora, stripped_lora = forge_entry(up, down, 2.0), forge_entry(up, down, 1.0, 0.5)
    live = {
        "diffusion_model.a.weight": [kept_lora, stripped_lora],  # plain, next to a kept plain LoRA: corrected
        "diffusion_model.b.weight": [stripped_lora],
        "diffusion_model.b.bias": [[1.0, ("diff", (torch.randn(6),)), 1.0, None, None]],  # bias patched too: copy
        "diffusion_model.c.weight": [forge_entry(up, down, strength_model=0.5), stripped_lora],  # kept not additive: copy
        "diffusion_model.d.weight": [forge_entry(up, down, dora=torch.ones(6, 1))],  # stripped DoRA: copy
        "diffusion_model.e.weight": [kept_lora],  # nothing stripped
    }
    reference = {"diffusion_model.a.weight": [kept_lora], "diffusion_model.c.weight": [live["diffusion_model.c.weight"][0]],
                 "diffusion_model.e.weight": [kept_lora]}
    patcher = PatcherLoras(view.model, live, reference, original=None, merge=None)
    corrections, keys = low_rank_corrections(view, [patcher])
    layers = view.model.diffusion_model
    assert list(corrections) == [layers.a] and keys == {layers.a: "model.diffusion_model.a.weight"}
    x = torch.randn(3, 6)
    torch.testing.assert_close(corrections[layers.a][0].output(x), F.linear(x, merged_delta(layers.a.weight, 0.5, up, down, 1.0)),
                               **TOLERANCE)
