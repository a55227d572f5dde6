"""m-sharpness (Foret et al., ICLR 2021, arXiv:2010.01412, §4.1) on both fronts: against references
written here from the paper's definition (per tensor for the torch front, per array in float64 for
the numpy front), its limit (one micro-batch is SAM), exceptions, the random state, and the two
fronts against each other (the same rule)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _family import grads_at, loss_of
from torch import nn

import sharpness
from sharpness import numpy as snp


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 4))


def batches(n, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def reference_msam(model, base, data, rho, n):
    """Each micro-batch perturbs with its own normalised gradient; the perturbed gradients are
    averaged; the base optimizer steps from the original weights with that mean."""
    params = list(model.parameters())
    for x, y in data:
        m = len(x) // n
        total = [torch.zeros_like(p) for p in params]
        for i in range(n):
            xi, yi = x[i * m : (i + 1) * m], y[i * m : (i + 1) * m]
            g = grads_at(model, xi, yi)
            norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(gi * (rho / (norm + 1e-12)))
            g_tilde = grads_at(model, xi, yi)
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            total = [a + b for a, b in zip(total, g_tilde)]
        for p, t in zip(params, total):
            p.grad = t / n
        base.step()


def run(opt, model, data, n):
    for x, y in data:
        m = len(x) // n

        def closure(i):
            opt.zero_grad()
            loss = loss_of(model, x[i * m : (i + 1) * m], y[i * m : (i + 1) * m])
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("n", [2, 4])
def test_matches_the_reference(backend, n):
    data = batches(10)
    ref = make_model()
    mine = copy.deepcopy(ref)
    reference_msam(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False), data, 0.1, n)
    opt = sharpness.MSharpnessSAM(
        mine.parameters(), torch.optim.SGD, micro_batches=n, rho=0.1, lr=0.05, momentum=0.9, backend=backend
    )
    run(opt, mine, data, n)
    for p, q in zip(ref.parameters(), mine.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.stats["steps"] == 10


def test_one_micro_batch_is_sam():
    data = batches(8)
    a, b = make_model(), make_model()
    opt_a = sharpness.SAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    for x, y in data:

        def closure():
            opt_a.zero_grad()
            loss = loss_of(a, x, y)
            loss.backward()
            return loss

        opt_a.step(closure)
    run(sharpness.MSharpnessSAM(b.parameters(), torch.optim.SGD, micro_batches=1, rho=0.1, lr=0.05, momentum=0.9), b, data, 1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_exception_in_a_micro_batch_leaves_the_weights_unperturbed():
    model = make_model()
    opt = sharpness.MSharpnessSAM(model.parameters(), torch.optim.SGD, micro_batches=2, rho=0.5, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    (x, y), *_ = batches(1)
    calls = []

    def closure(i):
        calls.append(i)
        opt.zero_grad()
        loss = loss_of(model, x[:8], y[:8])
        loss.backward()
        if len(calls) == 2:
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    with pytest.raises(ValueError):
        sharpness.MSharpnessSAM(model.parameters(), torch.optim.SGD, micro_batches=0, lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_first_and_second_step_are_refused():
    """The step takes its gradients through the closure only (two per micro-batch)."""
    model = make_model()
    opt = sharpness.MSharpnessSAM(model.parameters(), torch.optim.SGD, micro_batches=2, lr=0.1)
    (x, y), *_ = batches(1)
    loss_of(model, x, y).backward()
    for call in (opt.first_step, opt.second_step):
        with pytest.raises(RuntimeError, match="micro-batch.*call step\\(closure\\)"):
            call()


def test_same_noise_replays_each_micro_batchs_random_state():
    """Both calls of micro-batch i draw the same random numbers (those of its first call), the
    micro-batches draw on from one another, and the step leaves the random state where the plain
    first calls would."""
    model = make_model()
    opt = sharpness.MSharpnessSAM(model.parameters(), torch.optim.SGD, micro_batches=3, rho=0.1, lr=0.1)
    (x, y), *_ = batches(1)
    draws = []

    def closure(i):
        draws.append((i, torch.rand(2)))
        opt.zero_grad()
        loss = loss_of(model, x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4])
        loss.backward()
        return loss

    torch.manual_seed(5)
    expected = [torch.rand(2) for _ in range(3)]
    after = torch.get_rng_state()
    torch.manual_seed(5)
    opt.step(closure)
    assert [i for i, _ in draws] == [0, 0, 1, 1, 2, 2]
    for k, (_, d) in enumerate(draws):
        assert torch.equal(d, expected[k // 2])
    assert torch.equal(torch.get_rng_state(), after)


# == the numpy front (sharpness.numpy.MSharpnessSAM: the same rule over numpy arrays) ==============
# A least-squares problem with a tanh feature (nonlinear, so the perturbation matters) and its
# hand-written gradients; a per-array float64 reference with torch.optim.SGD's momentum step.


def np_problem(seed=0, n_micro=3):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((8, 5)) for _ in range(n_micro)]
    ys = [rng.standard_normal(8) for _ in range(n_micro)]
    w0 = [rng.standard_normal(5), rng.standard_normal(1)]
    return xs, ys, w0


def np_loss_and_grads(params, x, y):
    w, b = params
    z = np.tanh(x @ w + b[0])
    r = z - y
    dz = r * (1 - z**2) / len(y)
    return 0.5 * float(r @ r) / len(y), [x.T @ dz, np.array([dz.sum()])]


def np_reference(w, xs, ys, rho, lr, momentum, steps):
    """Per-array m-sharpness with SGD momentum (torch's rule), in float64."""
    w = [a.copy() for a in w]
    buf = None
    for _ in range(steps):
        acc = [np.zeros_like(a) for a in w]
        for x, y in zip(xs, ys):
            _, g = np_loss_and_grads(w, x, y)
            norm = math.sqrt(sum(float((a * a).sum()) for a in g))
            pert = [a + (rho / (norm + 1e-12)) * ga for a, ga in zip(w, g)]
            _, gp = np_loss_and_grads(pert, x, y)
            acc = [a + b for a, b in zip(acc, gp)]
        d = [a * (1.0 / len(xs)) for a in acc]
        buf = [a.copy() for a in d] if buf is None else [momentum * b + a for b, a in zip(buf, d)]
        w = [a - lr * b for a, b in zip(w, buf)]
    return w


def test_numpy_matches_the_reference_over_twenty_steps():
    xs, ys, w0 = np_problem()
    params = [a.copy() for a in w0]
    opt = snp.MSharpnessSAM(params, micro_batches=3, rho=0.1, lr=0.05, momentum=0.9)
    for _ in range(20):
        opt.step(lambda p, i: np_loss_and_grads(p, xs[i], ys[i]))
    want = np_reference(w0, xs, ys, rho=0.1, lr=0.05, momentum=0.9, steps=20)
    for got, ref in zip(params, want):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13)
    assert not np.allclose(params[0], np_reference(w0, xs, ys, rho=0.0, lr=0.05, momentum=0.9, steps=20)[0])


def test_numpy_one_micro_batch_is_sam_bit_for_bit():
    xs, ys, w0 = np_problem(n_micro=1)
    a, b = [x.copy() for x in w0], [x.copy() for x in w0]
    msam = snp.MSharpnessSAM(a, micro_batches=1, rho=0.1, lr=0.05, momentum=0.9)
    sam = snp.SAM(b, rho=0.1, lr=0.05, momentum=0.9)
    for _ in range(10):
        msam.step(lambda p, i: np_loss_and_grads(p, xs[i], ys[i]))
        sam.step(lambda p: np_loss_and_grads(p, xs[0], ys[0]))
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_the_fronts_agree():
    """The same rule on both fronts (the Rust engine on the torch front), the same data: the same
    trajectory, and the same mean loss."""
    xs, ys, w0 = np_problem()
    params = [a.copy() for a in w0]
    opt = snp.MSharpnessSAM(params, micro_batches=3, rho=0.1, lr=0.05, momentum=0.9)
    tw = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in w0]
    topt = sharpness.MSharpnessSAM(tw, torch.optim.SGD, micro_batches=3, rho=0.1, lr=0.05, momentum=0.9, backend="rust")

    def closure(i):
        topt.zero_grad()
        x, y = torch.from_numpy(xs[i]), torch.from_numpy(ys[i])
        r = torch.tanh(x @ tw[0] + tw[1][0]) - y
        loss = 0.5 * (r @ r) / len(y)
        loss.backward()
        return loss

    for _ in range(10):
        loss = opt.step(lambda p, i: np_loss_and_grads(p, xs[i], ys[i]))
        t_loss = topt.step(closure)
        assert float(t_loss) == pytest.approx(loss, rel=1e-12)
    for a, t in zip(params, tw):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert opt.stats["steps"] == topt.stats["steps"] == 10


def test_numpy_an_exception_in_the_second_pass_leaves_the_weights_at_w():
    xs, ys, w0 = np_problem()
    params = [a.copy() for a in w0]
    opt = snp.MSharpnessSAM(params, micro_batches=3, rho=0.1, lr=0.05)
    calls = []

    def grad_fn(p, i):
        calls.append(i)
        if len(calls) == 4:  # the second pass of micro-batch 1
            raise KeyboardInterrupt
        return np_loss_and_grads(p, xs[i], ys[i])

    with pytest.raises(KeyboardInterrupt):
        opt.step(grad_fn)
    for a, b in zip(params, w0):
        assert np.array_equal(a, b)
    assert not opt.perturbed


def test_numpy_bad_micro_batches_and_calls_are_refused():
    with pytest.raises(ValueError, match="micro_batches"):
        snp.MSharpnessSAM([np.zeros(2)], micro_batches=0)
    xs, ys, w0 = np_problem()
    opt = snp.MSharpnessSAM([a.copy() for a in w0], micro_batches=3)
    g = np_loss_and_grads(w0, xs[0], ys[0])[1]
    for call in (opt.first_step, opt.second_step):
        with pytest.raises(RuntimeError, match="call step\\(grad_fn\\)"):
            call(g)
