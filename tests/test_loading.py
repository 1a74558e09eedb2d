"""Model files: good ones load; each broken one gives one clear line naming the file."""

import dataclasses

import pytest
import torch
from conftest import ASSETS

from smoothprof.loading import (
    ModelFileError,
    check_loss,
    default_loss,
    first_batches,
    instantiate_model,
    load_model_file,
    make_dataloader,
)

pytestmark = pytest.mark.usefixtures("clean_sys_path")


def test_minimal_file_uses_the_default_loss():
    spec = load_model_file(ASSETS / "good_minimal.py")
    assert spec.loss is default_loss and not spec.has_own_loss
    assert spec.make_probe_batches is None and spec.defaults == {}
    assert len(spec.sha256) == 64
    model = instantiate_model(spec)
    batches = first_batches(spec, 2)
    assert len(batches) == 2
    assert check_loss(spec, model, batches[0]) > 0


def test_third_party_file_uses_every_optional_name():
    spec = load_model_file(ASSETS / "third_party.py")
    assert spec.has_own_loss
    assert spec.defaults["optimizer"] == "momentum"
    batches = first_batches(spec, 99)
    assert len(batches) == 2  # probe_batches() wins over the dataloader
    assert isinstance(batches[0], dict)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("does_not_exist.py", "no such file"),
        (".", "is a directory"),
        ("not_python.txt", "not a Python file"),
        ("broken_syntax.py", "syntax error"),
        ("broken_import_raises.py", "RuntimeError: dataset not found while being imported"),
        ("broken_no_model.py", "defines no model()"),
        ("broken_no_dataloader.py", "defines no dataloader()"),
        ("broken_model_not_callable.py", "model is an int, not a function"),
    ],
)
def test_broken_files_fail_at_load(name, expected):
    with pytest.raises(ModelFileError) as info:
        load_model_file(ASSETS / name)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert (ASSETS / name).name in message or name == "."


def test_syntax_error_names_the_line():
    with pytest.raises(ModelFileError, match=r"line \d+: syntax error"):
        load_model_file(ASSETS / "broken_syntax.py")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("broken_model_returns_tensor.py", "model() returned a tensor"),
        ("broken_no_trainable_params.py", "no parameters with requires_grad=True"),
        ("broken_meta_device.py", "with 9 of its 9 parameters and buffers on the meta device"),
    ],
)
def test_broken_models(name, expected):
    spec = load_model_file(ASSETS / name)
    with pytest.raises(ModelFileError) as info:
        instantiate_model(spec)
    assert expected in str(info.value)


def test_a_model_on_the_meta_device_says_how_to_materialize_it():
    spec = load_model_file(ASSETS / "broken_meta_device.py")
    with pytest.raises(ModelFileError) as info:
        instantiate_model(spec)
    message = str(info.value)
    assert "(first: '0.weight')" in message and "\n" not in message
    assert "model.to_empty(device=...)" in message and "assign=True" in message
    # One tensor left on the meta device is enough to refuse: a buffer.
    real = torch.nn.BatchNorm1d(3)
    real.register_buffer("scale", torch.empty(3, device="meta"))
    with pytest.raises(ModelFileError, match=r"with 1 of its 6 parameters and buffers .*'scale'"):
        instantiate_model(dataclasses.replace(spec, make_model=lambda: real))


def test_empty_dataloader():
    spec = load_model_file(ASSETS / "broken_empty_dataloader.py")
    make_dataloader(spec)
    with pytest.raises(ModelFileError, match="yields no batches"):
        first_batches(spec, 4)


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "broken_bad_batch.py",
            "the default loss raised TypeError: the default loss needs batches",
        ),
        ("broken_loss_nonscalar.py", "it must be a scalar"),
        ("broken_loss_not_tensor.py", "not a scalar tensor"),
        ("broken_loss_no_grad.py", "without a gradient"),
    ],
)
def test_broken_losses(name, expected):
    spec = load_model_file(ASSETS / name)
    model = instantiate_model(spec)
    batch = first_batches(spec, 1)[0]
    with pytest.raises(ModelFileError) as info:
        check_loss(spec, model, batch)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_model_file_can_import_its_neighbours(tmp_path):
    (tmp_path / "helper_net.py").write_text(
        "import torch\ndef net():\n    return torch.nn.Linear(2, 2)\n"
    )
    (tmp_path / "uses_helper.py").write_text(
        "import torch\nfrom helper_net import net\n"
        "def model():\n    return net()\n"
        "def dataloader():\n    return [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))]\n"
    )
    spec = load_model_file(tmp_path / "uses_helper.py")
    assert isinstance(instantiate_model(spec), torch.nn.Linear)


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("custom kernel has no backward on this device")


def test_backward_and_batches_turn_user_errors_into_one_line():
    spec = load_model_file(ASSETS / "good_minimal.py")
    model = instantiate_model(spec)
    x = torch.ones(2, 4)
    with pytest.raises(ModelFileError, match="the default loss returned a float, not a scalar"):
        spec.backward(0.5)
    with pytest.raises(ModelFileError, match="returned a tensor of shape"):
        spec.backward(model(x))
    with pytest.raises(ModelFileError) as raised:
        spec.backward(_FailingBackward.apply(model(x)).sum())
    assert "the backward pass of the default loss raised RuntimeError: custom kernel" in str(
        raised.value
    )
    spec.backward(model(x).sum())  # a good loss: gradients arrive
    assert model.weight.grad is not None

    def flaky():
        yield torch.ones(1)
        raise KeyError("shard 7")

    batches = spec.batches(flaky())
    assert next(batches).shape == (1,)
    with pytest.raises(ModelFileError, match=r"dataloader\(\) raised KeyError: 'shard 7'"):
        next(batches)
