"""The default loss reads the outputs models commonly return: a tensor of logits, a tuple whose
first element is the logits, a dict or an object carrying its own loss or its logits (as
``transformers``' ModelOutput), and says in one line what it found otherwise."""

from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import ASSETS
from torch import nn
from typer.testing import CliRunner

from smoothprof.cli import app
from smoothprof.loading import (
    ModelFileError,
    check_loss,
    default_loss,
    first_batches,
    instantiate_model,
    load_model_file,
)

pytestmark = pytest.mark.usefixtures("clean_sys_path")

X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0, 1, 2])


@dataclass
class LikeModelOutput(OrderedDict):
    """What ``transformers.utils.ModelOutput`` is: a dataclass and an ordered dict at once,
    whose ``loss`` is None unless the model was given labels."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("loss", "logits"):
            if getattr(self, name) is not None:
                self[name] = getattr(self, name)


class Attributes:
    def __init__(self, **values):
        self.__dict__.update(values)


class Wrapped(nn.Module):
    """A linear model whose forward returns its logits wrapped by ``wrap(logits, labels)``."""

    def __init__(self, wrap):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)
        self.wrap = wrap

    def forward(self, x, labels=None):
        return self.wrap(self.linear(x), labels)


def own_loss(logits, labels):
    """A loss that the model computes itself, different from the cross entropy."""
    return 2 * F.cross_entropy(logits, labels if labels is not None else Y)


Pair = namedtuple("Pair", "logits hidden")
CROSS_ENTROPY_OUTPUTS = {
    "a tensor": lambda logits, labels: logits,
    "a tuple": lambda logits, labels: (logits, logits.detach() * 0),
    "a list": lambda logits, labels: [logits, "extra"],
    "a named tuple": lambda logits, labels: Pair(logits, None),
    "a dict with logits": lambda logits, labels: {"logits": logits},
    "an object with .logits": lambda logits, labels: Attributes(logits=logits, loss=None),
    "a ModelOutput without labels": lambda logits, labels: LikeModelOutput(logits=logits),
}
OWN_LOSS_OUTPUTS = {
    "a dict with loss": lambda logits, labels: {"loss": own_loss(logits, labels), "x": logits},
    "an object with .loss": lambda logits, labels: Attributes(loss=own_loss(logits, labels)),
    "a ModelOutput with its loss": lambda logits, labels: LikeModelOutput(
        loss=own_loss(logits, labels), logits=logits
    ),
}


@pytest.mark.parametrize("kind", CROSS_ENTROPY_OUTPUTS)
def test_outputs_with_logits_give_their_cross_entropy(kind):
    model = Wrapped(CROSS_ENTROPY_OUTPUTS[kind])
    expected = F.cross_entropy(model.linear(X), Y)
    loss = default_loss(model, (X, Y))
    assert torch.equal(loss, expected)
    loss.backward()
    assert model.linear.weight.grad is not None


@pytest.mark.parametrize("kind", OWN_LOSS_OUTPUTS)
def test_outputs_with_their_own_loss_give_it(kind):
    model = Wrapped(OWN_LOSS_OUTPUTS[kind])
    expected = own_loss(model.linear(X), Y)
    assert torch.equal(default_loss(model, (X, Y)), expected)


def test_a_dict_batch_with_labels_gives_the_models_own_loss():
    """As a ``transformers`` model: ``model(**batch)`` with the labels in the batch."""
    model = Wrapped(lambda logits, labels: LikeModelOutput(
        loss=None if labels is None else own_loss(logits, labels), logits=logits
    ))  # fmt: skip
    loss = default_loss(model, {"x": X, "labels": Y})
    assert torch.equal(loss, own_loss(model.linear(X), Y))
    with pytest.raises(TypeError) as info:  # no labels: the model computed no loss
        default_loss(model, {"x": X})
    message = str(info.value)
    assert "model(**batch) on a dict batch and got a test_model_outputs.LikeModelOutput" in message
    assert "without a loss" in message and "labels" in message and "\n" not in message


@pytest.mark.parametrize(
    "output, named",
    [
        (lambda logits, labels: {"scores": logits}, "a dict"),
        (lambda logits, labels: ("text", logits), "a tuple of 2 items"),
        (lambda logits, labels: (), "a tuple of 0 items"),
        (lambda logits, labels: None, "a NoneType"),
        (lambda logits, labels: Attributes(scores=logits), "a test_model_outputs.Attributes"),
    ],
)
def test_an_unknown_output_is_named_in_one_line(output, named):
    with pytest.raises(TypeError) as info:
        default_loss(Wrapped(output), (X, Y))
    message = str(info.value)
    assert message.startswith(f"the default loss got {named} from model(x)")
    assert "define loss(model, batch)" in message and "\n" not in message


def test_an_unknown_output_stops_the_run_in_one_line(tmp_path):
    spec = load_model_file(ASSETS / "broken_unknown_output.py")
    model = instantiate_model(spec)
    with pytest.raises(ModelFileError) as info:
        check_loss(spec, model, first_batches(spec, 1)[0])
    assert "the default loss got a Prediction from model(x)" in str(info.value)
    result = CliRunner().invoke(
        app,
        ["run", str(ASSETS / "broken_unknown_output.py"), "-o", str(tmp_path / "x.h5")],
        env={"COLUMNS": "100"},
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ") and "the default loss raised TypeError" in line
    assert "Prediction" in line and not (tmp_path / "x.h5").exists()


class SequenceModel(nn.Module):
    """ids (B, T) -> logits (B, T, V), as a language model returns them (classes last)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab)

    def forward(self, ids):
        return self.embed(ids)


@pytest.mark.parametrize("wrap", [lambda t: t, lambda t: (t, "state"), lambda t: {"logits": t}])
def test_sequence_logits_classes_last_give_the_mean_over_every_position(wrap):
    torch.manual_seed(0)
    model = SequenceModel(vocab=7)
    ids, targets = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))
    logits = model.embed(ids)
    expected = F.cross_entropy(logits.reshape(15, 7), targets.reshape(15))
    assert torch.equal(default_loss(OutputOf(model, wrap), (ids, targets)), expected)
    # Classes second, as cross_entropy wants them, is unchanged; so is the ambiguous T == V.
    assert torch.equal(
        default_loss(OutputOf(model, lambda t: t.transpose(1, 2)), (ids, targets)),
        expected,
    )
    square_targets = torch.randint(0, 7, (3, 7))
    square = torch.randn(3, 7, 7)
    assert torch.equal(
        default_loss(OutputOf(lambda _: square, wrap), (ids, square_targets)),
        F.cross_entropy(square, square_targets),
    )


class OutputOf(nn.Module):
    def __init__(self, inner, wrap):
        super().__init__()
        self.inner, self.wrap = inner, wrap

    def forward(self, x):
        return self.wrap(self.inner(x))
