"""sharpness.measure against closed forms: quadratics ½wᵀAw with a known spectrum, linear least
squares (Hessian XᵀX/n), filter normalisation, exact restoration of the model; and on the demo's
MLP, SAM ends flatter than SGD."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharpness import measure

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: on a busy 2-core machine extra threads mostly wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Quadratic(nn.Module):
    """L(W) = ½ vec(W)ᵀ A vec(W) + bᵀ vec(W), W of shape ``shape``; the input is ignored."""

    def __init__(self, A: torch.Tensor, shape: tuple[int, ...], w0: torch.Tensor | None = None, b=None) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", torch.zeros(A.shape[0], dtype=A.dtype) if b is None else b)
        self.w = nn.Parameter(torch.zeros(shape, dtype=A.dtype) if w0 is None else w0.clone().reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.w.reshape(-1)
        return 0.5 * v @ self.A @ v + self.b @ v


def identity_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output


DUMMY = [(torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64))]
EIGENVALUES = torch.tensor([6.0, 3.0, 2.0, 1.0, 0.5, 0.25, -0.5, 0.1], dtype=F64)


def spd(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=_gen(seed)))
    return q @ torch.diag(eigenvalues) @ q.T


@pytest.fixture
def quadratic() -> Quadratic:
    return Quadratic(spd(EIGENVALUES), (2, 4))


# -- the Hessian ---------------------------------------------------------------------------------------


def test_power_iteration_finds_the_top_eigenvalue(quadratic):
    w0 = torch.randn(8, dtype=F64, generator=_gen(3))
    for model in (quadratic, Quadratic(quadratic.A, (8,), w0)):  # the Hessian does not depend on w
        value = measure.hessian_max_eigenvalue(model, identity_loss, DUMMY, iters=500, tol=1e-12, generator=_gen(1))
        assert value == pytest.approx(6.0, rel=1e-9)


@pytest.mark.parametrize(
    "eigenvalues, top",
    [([2.0, 1.0, 0.5, -8.0, -3.0], 2.0),  # a saddle: the most negative one dominates in magnitude
     ([-1.0, -2.0, -8.0, -0.5], -0.5)],  # negative definite: the largest is the one closest to 0
)
def test_power_iteration_returns_the_largest_not_the_most_negative(eigenvalues, top):
    A = spd(torch.tensor(eigenvalues, dtype=F64), seed=5)
    model = Quadratic(A, (len(eigenvalues),))
    value = measure.hessian_max_eigenvalue(model, identity_loss, DUMMY, iters=2000, tol=1e-13, generator=_gen(1))
    assert value == pytest.approx(top, rel=1e-8)


def test_power_iteration_stops_at_the_tolerance(quadratic):
    loose = measure.hessian_max_eigenvalue(quadratic, identity_loss, DUMMY, iters=1000, tol=1e-2, generator=_gen(1))
    assert loose == pytest.approx(6.0, rel=0.05)


def test_hutchinson_trace(quadratic):
    exact = float(EIGENVALUES.sum())  # 12.35
    # variance per sample 2(‖A‖_F² − Σ A_ii²) ≤ 2·Σλ² ≈ 91: 4000 samples, std error ≤ 0.15
    estimate = measure.hessian_trace(quadratic, identity_loss, DUMMY, samples=4000, generator=_gen(2))
    assert estimate == pytest.approx(exact, abs=0.6)
    diagonal = Quadratic(torch.diag(EIGENVALUES), (8,))  # Rademacher: exact with one sample
    assert measure.hessian_trace(diagonal, identity_loss, DUMMY, samples=1, generator=_gen(0)) == pytest.approx(exact)


def test_least_squares_hessian_is_gram_matrix():
    gen = _gen(4)
    n, d = 64, 5
    x = torch.randn(n, d, dtype=F64, generator=gen) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.2], dtype=F64)
    y = torch.randn(n, 1, dtype=F64, generator=gen)
    model = nn.Linear(d, 1, bias=False).to(F64)
    mse = lambda out, target: 0.5 * ((out - target) ** 2).mean()  # noqa: E731  Hessian XᵀX/n
    gram = x.T @ x / n
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]  # equal halves: the mean of the two is XᵀX/n
    top = measure.hessian_max_eigenvalue(model, mse, batches, iters=1000, tol=1e-13, generator=_gen(5))
    assert top == pytest.approx(float(torch.linalg.eigvalsh(gram)[-1]), rel=1e-8)
    trace = measure.hessian_trace(model, mse, batches, samples=3000, generator=_gen(6))
    assert trace == pytest.approx(float(gram.trace()), rel=0.08)


# -- m-sharpness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.05, 0.3])
def test_m_sharpness_at_the_minimum_is_half_rho_squared_lambda_max(quadratic, rho):
    # the gradient vanishes at w = 0: a random start, then the ascent is a power iteration
    value = measure.m_sharpness(quadratic, identity_loss, DUMMY, rho=rho, steps=80, generator=_gen(0))
    assert value == pytest.approx(0.5 * rho**2 * 6.0, rel=1e-6)


def test_m_sharpness_one_step_is_sams_perturbation():
    A = spd(EIGENVALUES, seed=1)
    w0 = torch.randn(8, dtype=F64, generator=_gen(7))
    model = Quadratic(A, (8,), w0)
    rho = 0.1
    loss = lambda w: 0.5 * w @ A @ w  # noqa: E731
    g = A @ w0
    expected = loss(w0 + rho * g / g.norm()) - loss(w0)
    assert measure.m_sharpness(model, identity_loss, DUMMY, rho=rho, steps=1) == pytest.approx(float(expected))
    # adaptive: δ = ρ T²g/‖Tg‖, T = |w| + η
    t = w0.abs() + 0.01
    expected = loss(w0 + rho * t * t * g / (t * g).norm()) - loss(w0)
    got = measure.m_sharpness(model, identity_loss, DUMMY, rho=rho, steps=1, adaptive=True, eta=0.01)
    assert got == pytest.approx(float(expected))
    # more steps find a worse point, never beyond the exact maximum over the ball
    many = measure.m_sharpness(model, identity_loss, DUMMY, rho=rho, steps=50)
    assert many >= measure.m_sharpness(model, identity_loss, DUMMY, rho=rho, steps=1) - 1e-12
    bound = rho * float(g.norm()) + 0.5 * rho**2 * 6.0
    assert many <= bound


def test_m_sharpness_averages_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    x, y = torch.randn(20, 4, dtype=F64), torch.randint(3, (20,))
    ce = nn.functional.cross_entropy
    a = measure.m_sharpness(model, ce, [(x[:10], y[:10])], rho=0.1, steps=3)
    b = measure.m_sharpness(model, ce, [(x[10:], y[10:])], rho=0.1, steps=3)
    both = measure.m_sharpness(model, ce, [(x[:10], y[:10]), (x[10:], y[10:])], rho=0.1, steps=3)
    assert both == pytest.approx((a + b) / 2)
    assert a > 0 and b > 0


# -- loss landscapes --------------------------------------------------------------------------------


def test_filter_normalisation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4, 7))
    d = measure.filter_normalized_direction(model, _gen(0))
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0, name  # biases and BN parameters ignored
        else:
            w_rows, d_rows = p.detach().flatten(1).norm(dim=1), d[name].flatten(1).norm(dim=1)
            torch.testing.assert_close(d_rows, w_rows)  # every filter at the norm of its weights
    kept = measure.filter_normalized_direction(model, _gen(0), ignore_bias_bn=False)
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            torch.testing.assert_close(kept[name].norm(), p.detach().norm())
    # the same seed, the same direction; scaling a filter of the weights scales its direction
    again = measure.filter_normalized_direction(model, _gen(0))
    assert all(torch.equal(d[k], again[k]) for k in d)
    with torch.no_grad():
        model[0].weight[2] *= 10
    scaled = measure.filter_normalized_direction(model, _gen(0))
    torch.testing.assert_close(scaled["0.weight"][2], 10 * d["0.weight"][2])
    torch.testing.assert_close(scaled["0.weight"][0], d["0.weight"][0])


def test_landscape_1d_of_a_quadratic_follows_the_formula():
    A = spd(EIGENVALUES, seed=2)
    w0 = torch.randn(8, dtype=F64, generator=_gen(8))
    b = torch.randn(8, dtype=F64, generator=_gen(9))
    model = Quadratic(A, (2, 4), w0, b)
    out = measure.loss_landscape_1d(model, identity_loss, DUMMY, steps=9, span=0.7, generator=_gen(3), chunk=4)
    d = out["direction"]["w"].reshape(-1)
    w = w0.reshape(-1)
    alphas = out["alphas"]
    assert alphas[0] == -0.7 and alphas[-1] == 0.7 and len(alphas) == 9
    expected = torch.stack([0.5 * (w + a * d) @ A @ (w + a * d) + b @ (w + a * d) for a in alphas])
    torch.testing.assert_close(out["losses"], expected)
    # = L(w) + α dᵀ(Aw + b) + ½ α² dᵀAd: a parabola of curvature dᵀAd
    parabola = (0.5 * w @ A @ w + b @ w) + alphas * (d @ (A @ w + b)) + 0.5 * alphas**2 * (d @ A @ d)
    torch.testing.assert_close(out["losses"], parabola)


def test_landscape_2d_of_a_quadratic_and_vmap_equals_loop():
    A = spd(EIGENVALUES, seed=3)
    w0 = torch.randn(8, dtype=F64, generator=_gen(10))
    model = Quadratic(A, (4, 2), w0)
    out = measure.loss_landscape_2d(model, identity_loss, DUMMY, steps=5, span=1.0, generator=_gen(4), chunk=7,
                                    vmap=True)
    d1, d2 = (d["w"].reshape(-1) for d in out["directions"])
    w = w0.reshape(-1)
    for i, a in enumerate(out["alphas"]):
        for j, b in enumerate(out["betas"]):
            v = w + a * d1 + b * d2
            assert float(out["losses"][i, j]) == pytest.approx(float(0.5 * v @ A @ v), rel=1e-12)
    loop = measure.loss_landscape_2d(model, identity_loss, DUMMY, steps=5, directions=out["directions"], vmap=False)
    torch.testing.assert_close(loop["losses"], out["losses"])


# -- the model is left as it was ----------------------------------------------------------------------


def _bn_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.0), nn.Linear(12, 4))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("training", [True, False])
def test_every_measure_restores_weights_buffers_and_mode(training):
    model = _bn_model()
    x, y = torch.randn(16, 6, generator=_gen(0)), torch.randint(4, (16,), generator=_gen(1))
    model.train()
    model(x)  # running statistics away from their initial values
    model.train(training)
    before = _snapshot(model)
    ids = {k: v.data_ptr() for k, v in model.state_dict().items()}
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    ce = nn.functional.cross_entropy
    calls = [
        lambda: measure.m_sharpness(model, ce, batches, rho=0.5, steps=3),
        lambda: measure.m_sharpness(model, ce, batches, rho=0.5, steps=2, adaptive=True),
        lambda: measure.hessian_max_eigenvalue(model, ce, batches, iters=5, generator=_gen(2)),
        lambda: measure.hessian_trace(model, ce, batches, samples=2, generator=_gen(3)),
        lambda: measure.loss_landscape_1d(model, ce, batches, steps=4, generator=_gen(4)),
        lambda: measure.loss_landscape_2d(model, ce, batches, steps=3, generator=_gen(5), ignore_bias_bn=False),
        lambda: measure.loss_landscape_1d(model, ce, batches, steps=3, generator=_gen(6), vmap=True, chunk=2),
    ]
    for call in calls:
        value = call()
        after = model.state_dict()
        for k, v in before.items():
            assert torch.equal(after[k], v), k  # bit for bit, BatchNorm statistics included
            assert after[k].data_ptr() == ids[k]  # in the same tensors
        assert all(m.training == training for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
        if isinstance(value, float):
            assert math.isfinite(value)


def test_bad_arguments():
    model = _bn_model()
    with pytest.raises(ValueError):
        measure.m_sharpness(model, nn.functional.cross_entropy, [], rho=0.1)
    with pytest.raises(ValueError):
        measure.m_sharpness(model, nn.functional.cross_entropy, DUMMY, rho=-1.0)
    with pytest.raises(ValueError):
        measure.hessian_max_eigenvalue(model, nn.functional.cross_entropy, DUMMY, iters=0)


# -- SAM ends flatter than SGD on the demo's MLP ---------------------------------------------------------


def test_sam_finds_a_flatter_minimum_than_sgd_on_the_demo_mlp():
    pytest.importorskip("sklearn")
    from sharpness import demo

    data = demo.load_noisy_digits(label_noise=0.4, seed=0)
    config = demo.DemoConfig(epochs=4, hidden=64, seeds=1, threads=None, progress=False, lr=0.05)
    init = demo.initial_state(config, data, seed=0)
    subset = [(data.x_train[i : i + 128], data.y_train[i : i + 128]) for i in range(0, 512, 128)]
    ce = nn.functional.cross_entropy
    values = {}
    for name in ("sgd", "sam"):  # the same start, the same batches (measured: λ_max 1.69 vs 1.02)
        run = demo.train_run(config, data, name, 0, init=init, keep_model=True)
        model = run.pop("model")
        values[name] = (
            measure.hessian_max_eigenvalue(model, ce, subset, iters=30, tol=1e-3, generator=_gen(0)),
            measure.m_sharpness(model, ce, subset, rho=0.1, steps=3),
        )
    assert values["sam"][0] < values["sgd"][0]
    assert values["sam"][1] < values["sgd"][1]
