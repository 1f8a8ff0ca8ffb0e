import pytest
import torch

from d2r_lib import models


@pytest.mark.parametrize("name,classes,count", [
    ("wrn34_10", 10, 46_160_474), ("wrn34_10", 100, 46_218_164),
    ("resnet18", 10, 11_173_962), ("resnet18", 100, 11_220_132),
    ("resnet18_standard", 10, 11_173_962), ("preact_resnet18", 10, 11_171_146),
    ("small_cnn", 10, 35_962),
])
def test_parameter_counts(name, classes, count):
    assert models.count_parameters(models.build_model(name, classes)) == count


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("size,classes", [(32, 10), (64, 200)])
def test_forward_shapes(name, size, classes):
    batch = 1 if name == "wrn34_10" else 2  # WRN-34-10 at 64×64 takes seconds on a 2-core CPU
    model = models.build_model(name, classes).eval()
    with torch.no_grad():
        out = model(torch.rand(batch, 3, size, size))
    assert out.shape == (batch, classes)
    assert torch.isfinite(out).all()


def test_guide_resnet18_keeps_32x32_in_layer2():
    model = models.build_model("resnet18")
    assert model.layer2[0].conv1.stride == (1, 1)
    assert models.build_model("resnet18_standard").layer2[0].conv1.stride == (2, 2)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="name must be one of 'small_cnn'.*got 'vgg16'"):
        models.build_model("vgg16")
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        models.build_model("small_cnn", 1)
    with pytest.raises(TypeError, match="num_classes must be an integer"):
        models.build_model("small_cnn", 10.0)
