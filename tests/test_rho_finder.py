"""The radius range test (``sharpness.find_rho``): the model comes back bit for bit, the budget
holds, the bisection and the pick follow the stated rule, and a radius that provably cannot train
is never picked.

The provable case is a Gaussian well, per sample ``ℓ_i(w) = 1 − exp(−‖w − x_i‖²/2)`` with every
``x_i`` near ``c`` and ``w`` starting at distance 1 from ``c``. SAM's ascent step moves ``w`` to
``w + ρ g/‖g‖``, *away* from the well, where the gradient has norm at most
``(1 + ρ) exp(−(1 + ρ)²/2)``; for ρ ≥ 3 that is below 1.4e-3, so 40 steps of learning rate 1 move
``w`` by less than 0.06 and the loss barely moves, while ρ = 0.01 descends into the well.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import sharpness
from sharpness import SAM
from sharpness.rho_finder import BACKOFF, DEFAULT_GRID, KEEP, MIN_DECREASE, MIN_STEPS, RhoSearch, find_rho, max_runs


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Well(nn.Module):
    """A point ``w`` in 2-D; the per-sample loss of a batch of centres ``x`` is ``1 − exp(−‖w − x‖²/2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - torch.exp(-((self.w - x) ** 2).sum(dim=1) / 2)


def well_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)  # per-sample losses


def well_batches(count: int = 10, size: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [0.05 * torch.randn(size, 2, generator=generator, dtype=torch.float64) for _ in range(count)]


def sam_sgd(lr: float = 1.0):
    return lambda params, rho: SAM(params, torch.optim.SGD, rho=rho, lr=lr)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


# -- the rule -----------------------------------------------------------------------------------------


def test_a_radius_that_cannot_train_is_never_picked():
    grid = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    result = find_rho(Well(), sam_sgd(), well_loss, well_batches(), grid=grid, budget_steps=40 * max_runs(len(grid)))
    assert isinstance(result, RhoSearch) and result.rho in grid
    rows = {row["rho"]: row for row in result.rows}
    for rho in (3.0, 10.0):  # the bound of the module docstring: these cannot train
        assert rows[rho]["status"] in ("fails", "not run")
    assert rows[10.0]["status"] == "fails"  # the largest radius always runs
    assert result.cliff is not None and result.cliff <= 3.0
    assert result.rho <= result.cliff / BACKOFF and rows[result.rho]["status"] in ("reference", "trains")
    assert rows[0.01]["decrease"] > 0.1  # the reference descends into the well


class GatedSGD(torch.optim.SGD):
    """Plain SGD that moves only for ρ below a threshold: a cliff known in advance."""

    def __init__(self, params, rho: float, threshold: float = 0.45) -> None:
        super().__init__(params, lr=0.5 if rho < threshold else 0.0)


def test_bisection_and_pick_follow_the_stated_rule():
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    result = find_rho(Well(), GatedSGD, well_loss, well_batches(), grid=grid, budget_steps=10 * max_runs(len(grid)))
    # reference 0.1; the largest, 0.9, fails; midpoint 0.5 fails; 0.3 trains; 0.4 trains: the cliff is 0.5
    assert [row["status"] for row in result.rows] == [
        "reference", "not run", "trains", "trains", "fails", "not run", "not run", "not run", "fails"]
    assert result.cliff == 0.5
    assert (KEEP, BACKOFF) == (0.2, 3.0)
    assert result.rho == 0.1  # the largest radius at or below 0.5 / 3 = 0.167
    for row in result.rows:
        if row["status"] in ("trains", "fails"):
            assert row["ratio"] == pytest.approx(row["decrease"] / result.rows[0]["decrease"])
            assert (row["ratio"] >= 0.2) == (row["status"] == "trains")
    assert result.rows[4]["decrease"] == 0.0  # lr 0: the weights never moved


def test_the_numbers_are_sams_trajectory():
    """The reference's held-out loss is that of SAM written out by hand (Foret et al. 2021, eq. 2:
    e = ρ g/‖g‖, then w ← w − lr ∇L(w + e)) over the training batches in order, after the first
    20% of them (2 of 10) are held out."""
    batches = well_batches()
    rho, lr, steps = 0.05, 0.5, 12
    result = find_rho(Well(), sam_sgd(lr), well_loss, batches, grid=[rho], budget_steps=steps)

    def loss(w, xs):
        return (1 - torch.exp(-((w - xs) ** 2).sum(dim=1) / 2)).mean()

    def grad(w, xs):
        w = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(w, xs), w)
        return g

    held_out, train = batches[:2], batches[2:]
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    initial = torch.cat([1 - torch.exp(-((w - x) ** 2).sum(dim=1) / 2) for x in held_out]).mean().item()
    train_losses = []
    for step in range(steps):
        xs = train[step % len(train)]
        g = grad(w, xs)
        train_losses.append(loss(w, xs).item())
        e = rho * g / (g.norm() + 1e-12)
        w = w - lr * grad(w + e, xs)
    final = torch.cat([1 - torch.exp(-((w - x) ** 2).sum(dim=1) / 2) for x in held_out]).mean().item()
    row = result.rows[0]
    assert result.initial_loss == pytest.approx(initial, rel=1e-12)
    assert row["val_loss"] == pytest.approx(final, rel=1e-10)
    assert row["decrease"] == pytest.approx(initial - final, rel=1e-9)
    assert row["train_loss"] == pytest.approx(sum(train_losses[-3:]) / 3, rel=1e-10)  # the last quarter
    assert row["steps"] == steps == result.steps and result.rho == rho


# -- the model comes back --------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scratch += 1  # a non-persistent buffer the training changes
        return self.body(x)


def classification_batches(count: int = 8, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=generator), torch.randint(3, (size,), generator=generator))
            for _ in range(count)]


def ce(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def everything(model: nn.Module):
    return (
        [t.detach().clone() for t in [*model.parameters(), *model.buffers()]],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        [id(t) for t in [*model.parameters(), *model.buffers()]],
    )


def assert_same(before, after):
    values, grads, flags, modes, ids = before
    values2, grads2, flags2, modes2, ids2 = after
    assert ids == ids2  # the same tensor objects, in place
    assert all(torch.equal(a, b) for a, b in zip(values, values2))  # bit for bit
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, grads2))
    assert flags == flags2 and modes == modes2


def prepared_net() -> Net:
    torch.manual_seed(0)
    model = Net()
    model.body[4].weight.grad = torch.full_like(model.body[4].weight, 0.5)  # a gradient left by the caller
    model.body[0].bias.requires_grad_(False)  # a frozen tensor
    model.body[1].eval()  # a module in another mode than its parent
    return model


def test_the_model_comes_back_bit_for_bit():
    model = prepared_net()
    before = everything(model)
    rng = torch.get_rng_state()
    result = quiet(find_rho, model, sam_sgd(0.1), ce, classification_batches(), grid=[0.01, 0.1, 1.0], budget_steps=60)
    assert result.steps > 0 and any(row["steps"] for row in result.rows[1:])
    assert_same(before, everything(model))
    assert torch.equal(rng, torch.get_rng_state())  # the caller's random state too


def test_the_model_comes_back_when_the_search_raises():
    model = prepared_net()
    before = everything(model)
    calls = 0

    def failing(model, batch):
        nonlocal calls
        calls += 1
        if calls > 7:  # after a few training steps of the first candidate
            raise RuntimeError("out of memory, say")
        return ce(model, batch)

    with pytest.raises(RuntimeError, match="out of memory"):
        find_rho(model, sam_sgd(0.1), failing, classification_batches(), grid=[0.01, 0.1], budget_steps=40)
    assert_same(before, everything(model))


# -- the budget, the batches, the table ------------------------------------------------------------


class Counting(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):
        Counting.steps += 1
        return super().step(closure)


def test_the_budget_is_respected():
    grid = list(DEFAULT_GRID)
    Counting.steps = 0
    budget = 100
    result = quiet(find_rho, Well(), lambda p, rho: Counting(p, lr=0.5 if rho < 0.1 else 0.0), well_loss,
                   well_batches(), grid=grid, budget_steps=budget)
    runs = sum(row["steps"] is not None for row in result.rows)
    assert Counting.steps == result.steps == runs * (budget // max_runs(len(grid))) <= budget
    assert result.steps_per_candidate == budget // 6 and max_runs(13) == 6
    assert runs <= max_runs(len(grid)) < len(grid)


def test_default_budget_and_held_out_batches():
    """Without val_batches the first ⌈20%⌉ batches are held out and only evaluated (eval mode);
    the rest train, cycled, each candidate in the same order; one pass of a candidate by default,
    at least 50 steps."""
    batches = [(i, x) for i, x in enumerate(well_batches(count=10))]
    seen: list[tuple[int, bool]] = []

    def loss(model, batch):
        seen.append((batch[0], model.training))
        return model(batch[1])

    result = find_rho(Well(), sam_sgd(), loss, batches, grid=[0.01, 0.1])
    assert result.steps_per_candidate == 50 and result.budget_steps == 100 and result.steps == 100
    evaluated = {i for i, training in seen if not training}
    trained = [i for i, training in seen if training]
    assert evaluated == {0, 1}
    # SAM calls the closure twice per step: every training batch twice, 2..9 cycled, per candidate
    order = [2 + (s % 8) for s in range(50) for _ in range(2)]
    assert trained == order + order


def test_val_batches_and_a_one_shot_iterable():
    class Loader:  # re-iterable without a length, like an IterableDataset's DataLoader
        def __iter__(self):
            return iter(well_batches(count=6))

    val = well_batches(count=2, size=8)
    result = find_rho(Well(), sam_sgd(), well_loss, Loader(), val_batches=val, grid=[0.01, 3.0], budget_steps=20)
    assert result.steps == 20 and [row["steps"] for row in result.rows] == [10, 10]
    model = Well()
    expected = (1 - torch.exp(-((model.w.detach() - torch.cat(val)) ** 2).sum(dim=1) / 2)).mean().item()
    assert result.initial_loss == pytest.approx(expected, rel=1e-12)


def test_the_table_lists_every_candidate(tmp_path):
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    result = find_rho(Well(), GatedSGD, well_loss, well_batches(), grid=grid, budget_steps=10 * max_runs(len(grid)))
    table = result.table()
    lines = table.splitlines()
    for rho, row in zip(grid, result.rows):
        line = next(line for line in lines if line.startswith(f"{rho:g} ") or line.startswith(f"{rho:g}  "))
        assert row["status"] in line
    assert "0.1 *" in table and "cliff (first failing radius): 0.5" in table
    path = tmp_path / "search.png"
    result.plot(path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_a_reference_that_barely_trains_stops_the_search_at_the_safe_end():
    """Too few steps (or too small a learning rate) for the smallest radius to lower the held-out
    loss by MIN_DECREASE of its initial value: no radius can be told apart, the pick is the smallest."""
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]

    def crawling(params, rho):
        return torch.optim.SGD(params, lr=1e-5)  # every radius "trains" as little as the reference

    with pytest.warns(RuntimeWarning, match="too little to tell radii apart"):
        result = find_rho(Well(), crawling, well_loss, well_batches(), grid=grid, budget_steps=10 * max_runs(len(grid)))
    assert result.rho == 0.1 and result.cliff is None
    assert 0 < result.rows[0]["decrease"] < MIN_DECREASE * result.initial_loss
    assert [row["status"] for row in result.rows[1:]] == ["not run"] * 8


def test_no_cliff_in_the_grid_is_said():
    with pytest.warns(RuntimeWarning, match="extend it upwards"):
        result = find_rho(Well(), sam_sgd(), well_loss, well_batches(), grid=[0.001, 0.01], budget_steps=40)
    assert result.rho == 0.001 and result.cliff is None and "extend it upwards" in result.table()  # ≤ 0.01 / 3


def test_default_grid_follows_the_methods_scale():
    sam = quiet(find_rho, Well(), sam_sgd(), well_loss, well_batches(), budget_steps=6 * MIN_STEPS)
    assert [row["rho"] for row in sam.rows] == list(DEFAULT_GRID)
    assert DEFAULT_GRID[0] == 0.01 and DEFAULT_GRID[-1] == 1.0 and len(DEFAULT_GRID) == 13
    assert all(b / a == pytest.approx(10 ** (1 / 6), rel=1e-3) for a, b in zip(DEFAULT_GRID, DEFAULT_GRID[1:]))

    def asam(params, rho):
        return SAM(params, torch.optim.SGD, rho=rho, adaptive=True, lr=1.0)

    def momentum_sam(params, rho):
        return sharpness.MomentumSAM(params, torch.optim.SGD, rho=rho, lr=0.5, momentum=0.9)

    for make, scale in ((asam, 10), (momentum_sam, 3)):  # radii on scales of their own
        result = quiet(find_rho, Well(), make, well_loss, well_batches(), budget_steps=6 * MIN_STEPS)
        assert [row["rho"] for row in result.rows] == pytest.approx([scale * rho for rho in DEFAULT_GRID])
        assert result.rows[0]["decrease"] > 0  # and it trained


def test_esam_gets_per_sample_losses():
    from sharpness import ESAM

    def esam(params, rho):
        return ESAM(params, torch.optim.SGD, rho=rho, beta=1.0, gamma=0.5, lr=1.0)

    result = quiet(find_rho, Well(), esam, well_loss, well_batches(), grid=[0.01, 10.0], budget_steps=40)
    assert result.rows[0]["decrease"] > 0.05 and result.rows[1]["status"] == "fails" and result.rho == 0.01
    model = Well()
    with pytest.raises(ValueError, match="per-sample losses"):
        find_rho(model, esam, lambda m, b: m(b).mean(), well_batches(), grid=[0.01], budget_steps=10)
    assert torch.equal(model.w.detach(), torch.tensor([1.0, 0.0], dtype=torch.float64))


# -- bad arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(grid=[]), "grid is empty"),
        (dict(grid=[0.1, 0.0]), "finite number > 0"),
        (dict(grid=[0.1, -1.0]), "finite number > 0"),
        (dict(grid=[0.1, math.nan]), "finite number > 0"),
        (dict(grid=[0.1, math.inf]), "finite number > 0"),
        (dict(grid=[0.1, "0.2"]), "finite number > 0"),
        (dict(grid=[0.1, 0.1]), "listed twice"),
        (dict(grid=[0.1, 0.2, 0.3], budget_steps=23), r"budget_steps >= 24"),
        (dict(grid=DEFAULT_GRID, budget_steps=47), r"budget_steps >= 48"),
        (dict(grid=[0.1], val_batches=[]), "val_batches is empty"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    model = Well()
    with pytest.raises(ValueError, match=message):
        find_rho(model, sam_sgd(), well_loss, well_batches(), **kwargs)
    assert torch.equal(model.w.detach(), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_too_few_batches_and_a_budget_of_the_wrong_type():
    with pytest.raises(ValueError, match="at least 2"):
        find_rho(Well(), sam_sgd(), well_loss, well_batches(count=1), grid=[0.1])
    with pytest.raises(ValueError, match="batches is empty"):
        find_rho(Well(), sam_sgd(), well_loss, [], val_batches=well_batches(count=1), grid=[0.1])
    with pytest.raises(TypeError, match="budget_steps must be an integer"):
        find_rho(Well(), sam_sgd(), well_loss, well_batches(), grid=[0.1], budget_steps=20.0)
