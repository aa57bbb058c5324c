import pytest
import torch
from torch import nn

from tune_alexnet.model import AlexNet, count_parameters


@pytest.mark.parametrize("dropout", [True, False])
@pytest.mark.parametrize("batchnorm,params", [(False, 36_054_858), (True, 36_057_162)])
def test_parameter_counts_and_output_shape(dropout, batchnorm, params):
    model = AlexNet(dropout=dropout, batchnorm=batchnorm)
    assert count_parameters(model) == params
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    assert any(isinstance(m, nn.Dropout) for m in model.modules()) == dropout
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (5 if batchnorm else 0)


def test_batchnorm_comes_after_relu_and_pools_where_spec_says():
    layers = list(AlexNet(dropout=False, batchnorm=True).features)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d"] * 2 + ["Conv2d", "ReLU", "BatchNorm2d"] * 2 + [
        "Conv2d",
        "ReLU",
        "BatchNorm2d",
        "MaxPool2d",
    ]
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.padding[0]) for c in convs] == [
        (3, 64, 5, 2),
        (64, 192, 5, 2),
        (192, 384, 3, 1),
        (384, 256, 3, 1),
        (256, 256, 3, 1),
    ]


def test_classifier_has_dropout_before_each_hidden_linear():
    kinds = [type(m).__name__ for m in AlexNet(dropout=True).classifier]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]


def test_width_scales_the_same_shape_down():
    small = AlexNet(dropout=True, batchnorm=True, width=0.125)
    assert count_parameters(small) < count_parameters(AlexNet()) / 50
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
