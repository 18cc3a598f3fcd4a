"""The parser's and embedder's one training loop: step budgets, so a run reproduces."""

import pytest
import torch

from export.train_loop import train_steps


def _run(seed: int, steps: int) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    record = train_steps(model.parameters(), lambda step: dict(mse=((model(x) - y) ** 2).mean()),
                         steps=steps, lr=0.05, name="test", log_every=5)
    return model.weight.detach().clone(), record


def test_the_same_budget_gives_the_same_weights_and_the_loss_falls():
    a, record = _run(0, 20)
    b, _ = _run(0, 20)
    assert torch.equal(a, b)
    assert record["steps"] == 20 and [e["step"] for e in record["log"]] == [5, 10, 15, 20]
    assert record["log"][-1]["mse"] < record["log"][0]["mse"]


def test_every_step_runs_once_and_an_empty_budget_is_refused():
    seen = []
    model = torch.nn.Linear(2, 1)

    def losses(step):
        seen.append(step)
        return dict(zero=model(torch.zeros(1, 2)).sum() * 0)
    train_steps(model.parameters(), losses, steps=3, lr=1.0, name="test")
    assert seen == [0, 1, 2]
    with pytest.raises(ValueError):
        train_steps(model.parameters(), losses, steps=0, lr=1.0, name="test")


def test_the_learning_rate_follows_a_cosine_to_zero():
    from export.train_loop import cosine_lr

    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    rates = []
    for progress in (0.0, 0.5, 1.0):
        cosine_lr(optimizer, 2.0, progress)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([2.0, 1.0, 0.0], abs=1e-9)
