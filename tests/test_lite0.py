"""The packaged ImageNet EfficientNet-Lite0: loading, and a real photo classified by the FCN."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import fcnify
from fcnify import ModelLoadError, load_model
from fcnify.models import map_by_order


def test_map_by_order_renames_and_checks_shapes():
    source = {"a.w": torch.zeros(2, 3), "a.b": torch.ones(2)}
    target = {"x.weight": torch.empty(2, 3), "x.bias": torch.empty(2)}
    mapped = map_by_order(source, target)
    assert list(mapped) == ["x.weight", "x.bias"] and torch.equal(mapped["x.bias"], torch.ones(2))
    with pytest.raises(ModelLoadError, match="'a.b' \\(3,\\) does not fit model tensor 'x.bias'"):
        map_by_order({"a.w": torch.zeros(2, 3), "a.b": torch.ones(3)}, target)
    with pytest.raises(ModelLoadError, match="holds 1 tensors, the model 2"):
        map_by_order({"a.w": torch.zeros(2, 3)}, target)


def _normalised(image: np.ndarray, size: int) -> torch.Tensor:
    pil = Image.fromarray(image).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).float() / 255
    return ((x - 0.5) / 0.5)[None]  # tf_efficientnet_lite0: mean = std = 0.5


@pytest.mark.slow
def test_converted_lite0_finds_the_cat_and_the_espresso():
    model, size = load_model("efficientnet_lite0_imagenet")
    assert size == (224, 224)
    fcn = fcnify.convert(model, input_size=size)
    cat, espresso = 285, 967  # ImageNet: Egyptian cat, espresso
    for image, label in ((data.chelsea(), cat), (data.coffee(), espresso)):
        with torch.no_grad():
            scores = fcn(_normalised(image, 224))
        assert scores.shape == (1, 1000, 1, 1)
        assert int(scores[0, :, 0, 0].argmax()) == label
