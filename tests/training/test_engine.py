import math

import pytest
import torch

from maskrcnn.config import TrainConfig
from training.engine import lr_lambda, train_one_epoch


class _ExplodingModel(torch.nn.Module):
    """Returns a finite loss, then NaN: the loop must stop with the loss dict."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, images, targets):
        self.calls += 1
        bad = torch.tensor(float("nan")) if self.calls > 1 else torch.tensor(0.0)
        return {"loss_classifier": self.w.sum() * 0.5, "loss_mask": self.w.sum() * bad}


def test_non_finite_loss_stops_with_the_loss_dict():
    model = _ExplodingModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batch = ([torch.zeros(3, 4, 4)], [{"labels": torch.zeros(0)}])
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 3 step 1: .*loss_classifier=0\.5.*loss_mask=nan"):
        train_one_epoch(model, opt, sched, [batch, batch, batch], torch.device("cpu"), 3, TrainConfig(log_every=1))
    assert model.calls == 2


def test_lr_warmup_then_cosine_and_step():
    cfg = TrainConfig(warmup_steps=10, lr_schedule="cosine")
    f = lr_lambda(cfg, 110)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 + 0.999 * 0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(110) == pytest.approx(0.01)
    step = lr_lambda(TrainConfig(warmup_steps=0, lr_schedule="step"), 90)
    assert [step(0), step(61), step(81)] == pytest.approx([1.0, 0.1, 0.01])
    const = lr_lambda(TrainConfig(warmup_steps=0, lr_schedule="constant"), 90)
    assert const(89) == 1.0 and not math.isnan(const(0))
