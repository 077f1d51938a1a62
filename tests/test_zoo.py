"""The model zoo: every architecture builds by name, runs, has the published size, and works
under ``functional_call`` + ``vmap(grad)`` — the way the Fisher code evaluates it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from core.errors import InvalidInput
from core.io.zoo import ARCHITECTURES, build_model, describe

# (arch, kwargs, input shape without batch, num_classes)
SMALL = [
    ("mlp", dict(in_features=64, hidden=[32, 16], num_classes=10), (64,), 10),
    ("lenet5", dict(input_size=8), (1, 8, 8), 10),
    ("resnet20", dict(width=4, num_classes=7), (3, 16, 16), 7),
    ("resnet32", dict(width=4, shortcut="B"), (3, 8, 8), 10),
    ("resnet56", dict(width=2, in_channels=1), (1, 8, 8), 10),
    ("mobilenet_v1", dict(width_mult=0.25, num_classes=5, small_input=True), (3, 16, 16), 5),
    ("resnet18", dict(num_classes=10, small_input=True), (3, 8, 8), 10),
    ("resnet50", dict(num_classes=3, in_channels=1), (1, 32, 32), 3),
]
PRUNABLE_OR_BN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def test_registry_names():
    assert set(ARCHITECTURES) == {
        "mlp",
        "lenet5",
        "resnet20",
        "resnet32",
        "resnet56",
        "mobilenet_v1",
        "resnet18",
        "resnet50",
    }


@pytest.mark.parametrize("arch,kwargs,shape,classes", SMALL, ids=[s[0] for s in SMALL])
def test_builds_and_forward_shape(arch, kwargs, shape, classes):
    torch.manual_seed(0)
    model = build_model(arch, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()
    # every parameter lives in a module the pruner recognises by type (or a BatchNorm)
    owners = {name for name, m in model.named_modules() if isinstance(m, PRUNABLE_OR_BN)}
    for name, _ in model.named_parameters():
        assert name.rsplit(".", 1)[0] in owners, name


@pytest.mark.parametrize("size,channels", [(8, 1), (28, 1), (32, 3)])
def test_lenet_input_sizes(size, channels):
    model = build_model("lenet5", in_channels=channels, input_size=size, num_classes=4).eval()
    assert model(torch.randn(3, channels, size, size)).shape == (3, 4)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_papers():
    # He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-32 0.46M, ResNet-56 0.85M (option A)
    assert 0.26e6 < _count(build_model("resnet20")) < 0.28e6
    assert 0.45e6 < _count(build_model("resnet32")) < 0.47e6
    assert 0.84e6 < _count(build_model("resnet56")) < 0.86e6
    # option B adds the 1×1 projections of the two downsampling blocks (+ their BN)
    assert _count(build_model("resnet20", shortcut="B")) - _count(build_model("resnet20")) == 16 * 32 + 32 * 64 + 2 * (
        32 + 64
    )
    # torchvision's resnet18 / resnet50 sizes at 1000 classes
    assert _count(build_model("resnet18")) == 11_689_512
    assert _count(build_model("resnet50")) == 25_557_032


def test_mobilenet_is_depthwise_separable_and_width_scales():
    full, thin = build_model("mobilenet_v1"), build_model("mobilenet_v1", width_mult=0.5)
    assert 4.1e6 < _count(full) < 4.3e6  # Howard et al. 2017, Table 8: 4.2M
    assert _count(thin) < _count(full) / 2.5
    convs = [m for m in thin.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 27
    depthwise = [m for m in convs if m.groups > 1]
    assert len(depthwise) == 13 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_small_input_resnet_keeps_resolution():
    stem = build_model("resnet18", small_input=True)
    assert stem.conv1.kernel_size == (3, 3) and stem.conv1.stride == (1, 1)
    assert isinstance(stem.maxpool, nn.Identity)
    assert build_model("resnet18").conv1.kernel_size == (7, 7)


VMAP = [SMALL[i] for i in (0, 1, 2, 5)]


@pytest.mark.parametrize("arch,kwargs,shape,classes", VMAP, ids=[s[0] for s in VMAP])
def test_functional_call_vmap_grad(arch, kwargs, shape, classes):
    torch.manual_seed(0)
    model = build_model(arch, **kwargs).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xb, yb):
        return F.cross_entropy(functional_call(model, (p, buffers), (xb,)), yb)

    x, y = torch.randn(3, 2, *shape), torch.randint(0, classes, (3, 2))
    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    ref = grad(loss)(params, x[1], y[1])
    for n in params:
        torch.testing.assert_close(g[n][1], ref[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "arch,kwargs,needle",
    [
        ("vgg16", {}, "unknown architecture"),
        ("mlp", dict(hidden_sizes=[3]), "hidden_sizes"),
        ("mlp", dict(activation="gelu"), "activation"),
        ("resnet20", dict(shortcut="C"), "shortcut"),
        ("mobilenet_v1", dict(width_mult=0), "width_mult"),
        ("lenet5", dict(input_size=2), "too small"),
        ("mlp", dict(hidden=[0]), "≥ 1"),
    ],
)
def test_bad_arch_or_kwargs_are_invalid_input(arch, kwargs, needle):
    with pytest.raises(InvalidInput) as e:
        build_model(arch, **kwargs)
    assert needle in e.value.detail
    assert e.value.status == 422


def test_unknown_kwarg_lists_the_allowed_ones():
    with pytest.raises(InvalidInput) as e:
        build_model("resnet20", depth=20, widht=4)
    assert "depth" in e.value.detail and "widht" in e.value.detail and "width" in e.value.detail
    assert {tuple(err["loc"]) for err in e.value.errors} == {("kwargs", "depth"), ("kwargs", "widht")}


def test_describe_lists_arguments_and_defaults():
    d = describe()
    assert set(d) == set(ARCHITECTURES)
    json.dumps(d)  # served by the API as is
    assert d["resnet20"]["args"]["width"]["default"] == 16
    assert d["resnet20"]["args"]["shortcut"]["default"] == "A"
    assert d["mlp"]["args"]["hidden"]["default"] == [256, 128]
    assert d["mobilenet_v1"]["args"]["width_mult"]["type"] == "float"
    assert set(d["resnet50"]["args"]) == {"in_channels", "num_classes", "small_input", "inner", "widths"}
    assert all(d[a]["doc"] for a in d)
