"""Tests of the numpy front, ``sharpness.numpy.SAM``.

The references below are written from the formulas (SAM: Foret et al. 2021, arXiv:2010.01412;
ASAM: Kwon et al. 2021, arXiv:2102.11600; the base steps as torch.optim.SGD / Adam / AdamW
document them) in plain per-array numpy, in float64; nothing but the class under test is imported
from the package, so the library is never checked against itself.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from sharpness.numpy import SAM

# --------------------------------------------------------------------------- reference

SGD_DEFAULTS = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                    maximize=False)
ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                     maximize=False)


class RefSAM:
    """SAM / ASAM + a torch.optim base step, per array, in float64, straight from the formulas."""

    def __init__(self, params, rho=0.05, adaptive=False, eta=0.01, base="sgd", **kw):
        self.w = [np.array(p, dtype=np.float64) for p in params]
        self.rho, self.adaptive, self.eta, self.base = rho, adaptive, eta, base
        defaults = dict(SGD_DEFAULTS) if base == "sgd" else dict(ADAM_DEFAULTS)
        if base == "adamw":
            defaults["weight_decay"] = 1e-2
        defaults.update(kw)
        self.hp = defaults
        self.t = 0
        self.buf = [None] * len(self.w)
        self.m = [np.zeros_like(w) for w in self.w]
        self.v = [np.zeros_like(w) for w in self.w]
        self.vmax = [np.zeros_like(w) for w in self.w]

    def first_step(self, grads):
        g = [np.asarray(x, dtype=np.float64) for x in grads]
        if self.adaptive:
            T = [np.abs(w) + self.eta for w in self.w]
            norm = math.sqrt(sum(float(np.sum((t * gi) ** 2)) for t, gi in zip(T, g)))
            e = [self.rho * t * t * gi / (norm + 1e-12) for t, gi in zip(T, g)]
        else:
            norm = math.sqrt(sum(float(np.sum(gi**2)) for gi in g))
            e = [self.rho * gi / (norm + 1e-12) for gi in g]
        if self.hp["maximize"]:  # SAM of -L
            e = [-x for x in e]
        self.backup = [w.copy() for w in self.w]
        if math.isfinite(norm):
            self.w = [w + x for w, x in zip(self.w, e)]
        return norm

    def second_step(self, grads):
        self.w = self.backup
        self.base_step(grads)

    def base_step(self, grads):
        g = [np.asarray(x, dtype=np.float64) for x in grads]
        (self._sgd if self.base == "sgd" else self._adam)(g)

    def _sgd(self, grads):  # torch.optim.SGD, single-tensor path
        hp = self.hp
        for i, g in enumerate(grads):
            if hp["maximize"]:
                g = -g
            if hp["weight_decay"]:
                g = g + hp["weight_decay"] * self.w[i]
            if hp["momentum"]:
                if self.buf[i] is None:
                    self.buf[i] = g.copy()
                else:
                    self.buf[i] = hp["momentum"] * self.buf[i] + (1 - hp["dampening"]) * g
                g = g + hp["momentum"] * self.buf[i] if hp["nesterov"] else self.buf[i]
            self.w[i] = self.w[i] - hp["lr"] * g

    def _adam(self, grads):  # torch.optim.Adam / AdamW, single-tensor path
        hp = self.hp
        b1, b2 = hp["betas"]
        self.t += 1
        for i, g in enumerate(grads):
            if hp["maximize"]:
                g = -g
            if hp["weight_decay"]:
                if self.base == "adamw":
                    self.w[i] = self.w[i] * (1 - hp["lr"] * hp["weight_decay"])
                else:
                    g = g + hp["weight_decay"] * self.w[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
            v = self.v[i]
            if hp["amsgrad"]:
                self.vmax[i] = np.maximum(self.vmax[i], self.v[i])
                v = self.vmax[i]
            denom = np.sqrt(v) / math.sqrt(bc2) + hp["eps"]
            self.w[i] = self.w[i] - hp["lr"] / bc1 * self.m[i] / denom


# --------------------------------------------------------------------------- problem

SHAPES = [(7,), (3, 5), (2, 3, 4), (), (0,), (1,)]


def make_problem(seed, dtypes):
    """Initial weights and a smooth, non-quadratic loss with gradient a(w-c) + 0.1(w-c)³."""
    rng = np.random.default_rng(seed)
    w0, a, c = [], [], []
    for shape, dt in zip(SHAPES, dtypes):
        w = rng.normal(size=shape)
        w0.append(w.astype(dt))
        a.append(rng.uniform(0.5, 2.0, size=shape))
        off = rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        c.append(w + off)

    def grads_at(ws, out_dtypes):
        out = []
        for w, ai, ci, dt in zip(ws, a, c, out_dtypes):
            d = np.asarray(w, dtype=np.float64) - ci
            out.append(np.asarray(ai * d + 0.1 * d**3, dtype=dt))
        return out

    return w0, grads_at


CONFIGS = [
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("sgd", dict(lr=0.01, momentum=0.5, maximize=True)),
    ("adam", dict(lr=0.02)),
    ("adam", dict(lr=0.02, betas=(0.8, 0.99), weight_decay=1e-2, amsgrad=True)),
    ("adamw", dict(lr=0.02, weight_decay=0.1)),
    ("adamw", dict(lr=0.02, amsgrad=True, maximize=True)),
]
CONFIG_IDS = [f"{b}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for b, kw in CONFIGS]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-11, atol=1e-13)}


def tolerance(dtypes):
    """float32 anywhere reaches every array through the global norm."""
    return TOL[np.float32] if np.float32 in dtypes else TOL[np.float64]


def run_pair(dtypes, base, kw, rho, adaptive, steps=20, seed=0, check_each_step=True):
    w0, grads_at = make_problem(seed, dtypes)
    params = [w.copy() for w in w0]
    opt = SAM(params, rho=rho, adaptive=adaptive, eta=0.01, base=base, **kw)
    ref = RefSAM(w0, rho=rho, adaptive=adaptive, eta=0.01, base=base, **kw)
    f64 = [np.float64] * len(dtypes)
    for _ in range(steps):
        assert opt.first_step(grads_at(params, dtypes)) is True  # a second pass follows
        n = opt.last_grad_norm
        n_ref = ref.first_step(grads_at(ref.w, f64))
        assert n == pytest.approx(n_ref, rel=1e-5)
        opt.second_step(grads_at(params, dtypes))
        ref.second_step(grads_at(ref.w, f64))
        if check_each_step:
            for p, r in zip(params, ref.w):
                np.testing.assert_allclose(p, r, **tolerance(dtypes))
    return params, ref


# --------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(("base", "kw"), CONFIGS, ids=CONFIG_IDS)
def test_trajectory_matches_reference(base, kw, adaptive, dtype):
    rho = 0.5 if adaptive else 0.05
    params, ref = run_pair([dtype] * len(SHAPES), base, kw, rho, adaptive)
    assert all(p.dtype == dtype for p in params)
    # the perturbation mattered: the trajectory is not the base optimizer's
    base_only = RefSAM(make_problem(0, [np.float64] * 6)[0], rho=0.0, base=base, **kw)
    _, grads_at = make_problem(0, [np.float64] * 6)
    for _ in range(20):
        base_only.first_step(grads_at(base_only.w, [np.float64] * 6))
        base_only.second_step(grads_at(base_only.w, [np.float64] * 6))
    diff = max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(ref.w, base_only.w))
    assert diff > 1e-5


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(("base", "kw"), [CONFIGS[2], CONFIGS[5]], ids=["sgd", "adam"])
def test_mixed_dtypes_share_one_global_norm(base, kw, adaptive):
    dtypes = [np.float32, np.float64, np.float64, np.float32, np.float32, np.float64]
    params, ref = run_pair(dtypes, base, kw, 0.5 if adaptive else 0.05, adaptive)
    for p, dt in zip(params, dtypes):
        assert p.dtype == dt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(("base", "kw"), [CONFIGS[2], CONFIGS[7]], ids=["sgd", "adamw"])
def test_large_arrays_match_reference(base, kw, adaptive, dtype):
    """Arrays spanning many kernel chunks (and threads), odd lengths included."""
    rng = np.random.default_rng(7)
    shapes = [(301, 257), (40_001,), (3,)]
    w0 = [rng.normal(size=s) for s in shapes]
    c = [w + rng.choice([-1.0, 1.0], size=w.shape) for w in w0]
    params = [w.astype(dtype) for w in w0]
    opt = SAM(params, rho=0.5 if adaptive else 0.05, adaptive=adaptive, base=base, **kw)
    ref = RefSAM(w0, rho=0.5 if adaptive else 0.05, adaptive=adaptive, base=base, **kw)

    def grads(ws, dt):
        return [np.asarray(np.float64(w) - ci + 0.1 * (np.float64(w) - ci) ** 3, dt)
                for w, ci in zip(ws, c)]

    for _ in range(5):
        opt.first_step(grads(params, dtype))
        ref.first_step(grads(ref.w, np.float64))
        opt.second_step(grads(params, dtype))
        ref.second_step(grads(ref.w, np.float64))
    for p, r in zip(params, ref.w):
        np.testing.assert_allclose(p, r, **TOL[dtype])


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(("base", "kw"), CONFIGS, ids=CONFIG_IDS)
def test_rho_zero_is_the_base_optimizer(base, kw, adaptive):
    w0, grads_at = make_problem(1, [np.float64] * 6)
    params = [w.copy() for w in w0]
    opt = SAM(params, rho=0.0, adaptive=adaptive, base=base, **kw)
    ref = RefSAM(w0, rho=0.0, base=base, **kw)
    f64 = [np.float64] * 6
    for _ in range(20):
        g = grads_at(params, f64)
        opt.first_step(g)
        opt.second_step(g)
        ref.base_step(grads_at(ref.w, f64))
    for p, r in zip(params, ref.w):
        np.testing.assert_allclose(p, r, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(
    ("base", "kw"),
    [
        ("sgd", dict(lr=0.0, momentum=0.9, nesterov=True, weight_decay=0.1)),
        ("adam", dict(lr=0.0, weight_decay=0.1, amsgrad=True)),
        ("adamw", dict(lr=0.0, weight_decay=0.1)),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_restoration_is_exact(base, kw, adaptive, dtype):
    """With lr=0 every step must give back the weights bit for bit (no w+e-e drift)."""
    rng = np.random.default_rng(2)
    params = [np.array(rng.normal(size=s) * 10.0 ** rng.integers(-3, 3), dtype) for s in SHAPES]
    saved = [p.copy() for p in params]
    opt = SAM(params, rho=2.0 if adaptive else 0.5, adaptive=adaptive, base=base, **kw)
    for _ in range(50):
        opt.first_step([np.array(rng.normal(size=s), dtype) for s in SHAPES])
        assert any(not np.array_equal(p, s) for p, s in zip(params, saved))
        opt.second_step([np.array(rng.normal(size=s), dtype) for s in SHAPES])
        for p, s in zip(params, saved):
            assert p.tobytes() == s.tobytes()


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(
    ("base", "kw"), [CONFIGS[1], CONFIGS[5]], ids=["sgd-momentum", "adam-amsgrad"]
)
def test_nonfinite_gradient_skips_the_perturbation(base, kw, adaptive, bad):
    dtypes = [np.float32, np.float64] * 3
    w0, grads_at = make_problem(3, dtypes)
    a = [w.copy() for w in w0]
    b = [w.copy() for w in w0]
    opt_a = SAM(a, rho=0.5, adaptive=adaptive, base=base, **kw)
    # twin optimizer; at the bad steps it gets zero gradients, whose perturbation is exactly 0,
    # so its second_step is the plain base step from the same optimizer state
    opt_b = SAM(b, rho=0.5, adaptive=adaptive, base=base, **kw)
    for step in range(6):
        if step in (2, 3):
            g_bad = grads_at(a, dtypes)
            g_bad[3].flat[0] = bad
            before = [p.copy() for p in a]
            assert opt_a.first_step(g_bad) is True  # second_step takes the plain base step
            assert not math.isfinite(opt_a.last_grad_norm)
            for p, q in zip(a, before):  # weights untouched by the perturbation
                assert p.tobytes() == q.tobytes()
            opt_b.first_step([np.zeros_like(p) for p in b])
            for p, q in zip(b, before):
                assert p.tobytes() == q.tobytes()
            g2 = grads_at(a, dtypes)
            opt_a.second_step(g2)
            opt_b.second_step(g2)
        else:
            opt_a.step(lambda ps: (0.0, grads_at(ps, dtypes)))
            opt_b.step(lambda ps: (0.0, grads_at(ps, dtypes)))
        for p, q in zip(a, b):  # bit for bit
            assert p.tobytes() == q.tobytes()
    sd = opt_a.state_dict()
    assert sd["sam"]["stats"]["nonfinite_skips"] == 2 and "nonfinite_skips" not in opt_b.state_dict()["sam"]["stats"]
    assert sd["sam"]["state"]["step"] == 6
    assert all(np.all(np.isfinite(p)) for p in a)


def test_nonfinite_step_matches_reference_base_step():
    w0, grads_at = make_problem(4, [np.float64] * 6)
    params = [w.copy() for w in w0]
    opt = SAM(params, rho=0.05, base="sgd", lr=0.1, momentum=0.9)
    ref = RefSAM(w0, rho=0.0, base="sgd", lr=0.1, momentum=0.9)
    g = grads_at(params, [np.float64] * 6)
    g[0][0] = np.nan
    opt.first_step(g)
    g2 = grads_at(params, [np.float64] * 6)
    opt.second_step(g2)
    ref.base_step(g2)
    for p, r in zip(params, ref.w):
        np.testing.assert_allclose(p, r, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- step()


def test_step_calls_grad_fn_twice_and_returns_first_loss():
    w0, grads_at = make_problem(5, [np.float64] * 6)
    params = [w.copy() for w in w0]
    opt = SAM(params, rho=0.1, base="sgd", lr=0.1)
    ref = RefSAM(w0, rho=0.1, base="sgd", lr=0.1)
    seen = []

    def grad_fn(ps):
        assert ps is opt.params or all(p is q for p, q in zip(ps, params))
        seen.append([p.copy() for p in ps])
        return len(seen), grads_at(ps, [np.float64] * 6)

    assert opt.step(grad_fn) == 1
    assert len(seen) == 2
    f64 = [np.float64] * 6
    ref.first_step(grads_at(ref.w, f64))
    for s, r in zip(seen[1], ref.w):  # the second call sees w + e
        np.testing.assert_allclose(s, r, rtol=1e-13, atol=1e-15)
    ref.second_step(grads_at(ref.w, f64))
    for p, r in zip(params, ref.w):
        np.testing.assert_allclose(p, r, rtol=1e-13, atol=1e-15)
    assert opt.step(grad_fn) == 3


def test_step_restores_weights_when_second_call_fails():
    params = [np.arange(5, dtype=np.float32), np.ones((2, 2))]
    saved = [p.copy() for p in params]
    opt = SAM(params, rho=0.5, base="adam", lr=0.1)
    calls = []

    def grad_fn(ps):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 0.0, [np.ones_like(p) for p in ps]

    with pytest.raises(KeyboardInterrupt):
        opt.step(grad_fn)
    for p, s in zip(params, saved):
        assert p.tobytes() == s.tobytes()
    assert not opt.perturbed
    opt.step(lambda ps: (0.0, [np.ones_like(p) for p in ps]))  # usable again


# --------------------------------------------------------------------------- state_dict


def _plain(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or type(obj) in (bool, int, float, str) or type(obj) is np.ndarray


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(
    ("base", "kw"), [CONFIGS[2], CONFIGS[5], CONFIGS[7]], ids=["sgd", "adam", "adamw"]
)
def test_state_dict_round_trip_continues_bit_for_bit(base, kw, adaptive):
    dtypes = [np.float32, np.float64, np.float32, np.float32, np.float64, np.float64]
    w0, grads_at = make_problem(6, dtypes)
    params = [w.copy() for w in w0]
    opt = SAM(params, rho=0.3, adaptive=adaptive, base=base, **kw)
    fn = lambda ps: (0.0, grads_at(ps, dtypes))  # noqa: E731
    for _ in range(7):
        opt.step(fn)
    sd = opt.state_dict()
    assert _plain(sd)
    snapshot = copy.deepcopy(sd)
    resume = [p.copy() for p in params]
    for _ in range(8):
        opt.step(fn)
    # later steps did not change the saved dict
    assert sd["sam"]["state"]["step"] == snapshot["sam"]["state"]["step"] == 7
    assert sorted(sd["state"]) == list(range(len(params)))  # torch's layout: per parameter index
    for i, s in sd["state"].items():
        t = snapshot["state"][i]
        for k in s:
            assert np.asarray(s[k]).tobytes() == np.asarray(t[k]).tobytes()
    for i, s in sd["state"].items():
        for v in s.values():
            assert not isinstance(v, np.ndarray) or (v.dtype == params[i].dtype and v.shape == params[i].shape)

    opt2 = SAM(resume, rho=123.0, adaptive=not adaptive, base=base, lr=0.5)  # overwritten
    opt2.load_state_dict(sd)
    for s in sd["state"].values():  # the loaded arrays are copies
        for v in s.values():
            if isinstance(v, np.ndarray):
                v[...] = 1e30
    for _ in range(8):
        opt2.step(fn)
    for p, q in zip(params, resume):
        assert p.tobytes() == q.tobytes()
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["sam"]["state"]["step"] == b["sam"]["state"]["step"] == 15
    assert a["state"].keys() == b["state"].keys()
    for i, s in a["state"].items():
        t = b["state"][i]
        assert s.keys() == t.keys()
        for k in s:
            assert np.asarray(s[k]).tobytes() == np.asarray(t[k]).tobytes()


def test_state_dict_errors():
    params = [np.zeros(3), np.zeros(2, np.float32)]
    opt = SAM(params, base="sgd", lr=0.1, momentum=0.9)
    opt.step(lambda ps: (0.0, [np.ones_like(p) for p in ps]))
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="base"):
        SAM([np.zeros(3), np.zeros(2, np.float32)], base="adam").load_state_dict(sd)
    with pytest.raises(ValueError, match="parameters"):
        SAM([np.zeros(3)], base="sgd").load_state_dict(sd)
    with pytest.raises(ValueError, match="shape"):
        SAM([np.zeros(4), np.zeros(2, np.float32)], base="sgd").load_state_dict(sd)
    with pytest.raises(ValueError, match="float64"):
        SAM([np.zeros(3, np.float32), np.zeros(2, np.float32)], base="sgd").load_state_dict(sd)
    opt.first_step([np.ones(3), np.ones(2, np.float32)])
    with pytest.raises(RuntimeError, match="second_step"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="second_step"):
        opt.load_state_dict(sd)


# --------------------------------------------------------------------------- errors


def test_invalid_params():
    f32 = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="list"):
        SAM(f32)
    with pytest.raises(TypeError, match="list"):
        SAM(3.0)
    with pytest.raises(ValueError, match="empty"):
        SAM([])
    with pytest.raises(TypeError, match="numpy array"):
        SAM([f32, [1.0, 2.0]])
    for dt in (np.float16, np.int32, np.complex64, np.dtype(">f4")):
        with pytest.raises(TypeError, match="dtype"):
            SAM([np.zeros(3, dt)])
    with pytest.raises(ValueError, match="contiguous"):
        SAM([np.zeros((4, 4)).T])
    with pytest.raises(ValueError, match="contiguous"):
        SAM([np.zeros(8)[::2]])
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        SAM([ro])
    with pytest.raises(ValueError, match="share memory"):
        SAM([f32, f32])
    big = np.zeros(10)
    with pytest.raises(ValueError, match="share memory"):
        SAM([big[:6], big[4:]])
    SAM([big[:5], big[5:]])  # adjacent views do not overlap


def test_invalid_hyperparams():
    p = [np.zeros(3)]
    with pytest.raises(ValueError, match="base"):
        SAM(p, base="rmsprop")
    with pytest.raises(TypeError, match="momentum"):
        SAM(p, base="adam", momentum=0.9)
    with pytest.raises(TypeError, match="foreach"):
        SAM(p, base="sgd", foreach=True)
    with pytest.raises(ValueError, match="rho"):
        SAM(p, rho=-0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM(p, rho=float("nan"))
    with pytest.raises(ValueError, match="eta"):
        SAM(p, eta=-1.0)
    with pytest.raises(ValueError, match="lr"):
        SAM(p, lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        SAM(p, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        SAM(p, nesterov=True, momentum=0.9, dampening=0.1)
    with pytest.raises(ValueError, match="betas"):
        SAM(p, base="adam", betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="betas"):
        SAM(p, base="adamw", betas=0.9)
    with pytest.raises(ValueError, match="eps"):
        SAM(p, base="adamw", eps=-1e-8)
    with pytest.raises(TypeError, match="adaptive"):
        SAM(p, adaptive="yes")
    opt = SAM(p, base="adamw")
    group = opt.param_groups[0]
    assert group["weight_decay"] == 1e-2 and group["lr"] == 1e-3 and group["decoupled_weight_decay"] is True
    # settings are per group and checked at every call: a bad one changes nothing
    w0 = p[0].copy()
    group["lr"] = -0.5
    with pytest.raises(ValueError, match="lr"):
        opt.step(lambda ps: (0.0, [np.ones(3)]))
    assert p[0].tobytes() == w0.tobytes() and not opt.perturbed
    group["lr"] = 1e-3
    group["sam_rho"] = "0.1"
    with pytest.raises(TypeError, match="sam_rho"):
        opt.first_step([np.ones(3)])
    group["sam_rho"] = 0.1
    group["sam_rhoo"] = 0.1  # a misspelt setting
    with pytest.raises(TypeError, match="sam_rhoo"):
        opt.first_step([np.ones(3)])
    del group["sam_rhoo"]
    # an attribute that is not a setting is refused, not silently ignored
    for name in ("rho", "lr", "momentum", "sam_rho"):
        with pytest.raises(AttributeError, match="param_groups"):
            setattr(opt, name, 0.1)
    opt.step(lambda ps: (0.0, [np.ones(3)]))


def test_invalid_grads_and_call_order():
    params = [np.zeros(3, np.float32), np.zeros((2, 2))]
    opt = SAM(params, base="sgd", lr=0.1)
    good = [np.ones(3, np.float32), np.ones((2, 2))]
    with pytest.raises(RuntimeError, match="needs a first_step"):
        opt.second_step(good)
    with pytest.raises(ValueError, match="1 gradient arrays for 2 parameters"):
        opt.first_step(good[:1])
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype float64"):
        opt.first_step([np.ones(3), np.ones((2, 2))])
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(4,\)"):
        opt.first_step([good[0], np.ones(4)])
    with pytest.raises(TypeError, match="not one array"):
        opt.first_step(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        opt.first_step([[1.0, 1.0, 1.0], good[1]])
    assert not opt.perturbed
    # non-contiguous gradients are accepted (they are only read)
    opt.first_step([np.ones(6, np.float32)[::2], np.ones((2, 2)).T])
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step(good)
    with pytest.raises(ValueError, match="gradient arrays"):
        opt.second_step(good[:1])
    assert opt.perturbed  # a rejected second_step leaves the step pending
    opt.second_step(good)
    with pytest.raises(TypeError, match="pair"):
        opt.step(lambda ps: good)  # grads alone, not (loss, grads)
    assert not opt.perturbed
    # numpy scalars are accepted for 0-d parameters
    opt0 = SAM([np.zeros((), np.float32), np.zeros(2, np.float32)], lr=0.1)
    opt0.step(lambda ps: (0.0, [np.float32(1.0), np.ones(2, np.float32)]))
    assert opt0.params[0] == np.float32(-0.1)


# --------------------------------------------------------------------------- torch semantics


def _torch_case(dtype_name, base, adaptive):
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 16, 8, generator=g, dtype=tdt)
    Y = torch.randint(0, 3, (20, 16), generator=g)
    init = [
        torch.randn(8, 12, generator=g, dtype=tdt) * 0.4,
        torch.randn(12, generator=g, dtype=tdt) * 0.1,
        torch.randn(12, 3, generator=g, dtype=tdt) * 0.4,
        torch.randn(3, generator=g, dtype=tdt) * 0.1,
    ]

    def loss_of(ps, x, y):
        h = torch.tanh(x @ ps[0] + ps[1])
        return torch.nn.functional.cross_entropy(h @ ps[2] + ps[3], y)

    return torch, X, Y, init, loss_of


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize(
    ("base", "kw"),
    [
        ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-3)),
        ("sgd", dict(lr=0.1, momentum=0.8, dampening=0.2)),
        ("adam", dict(lr=0.01, weight_decay=1e-3, amsgrad=True)),
        ("adamw", dict(lr=0.01, weight_decay=0.1)),
    ],
    ids=["sgd-nesterov", "sgd-dampening", "adam", "adamw"],
)
def test_matches_torch_optim(dtype_name, base, kw, adaptive):
    """The numpy front against torch.optim (foreach=False) with a per-tensor SAM in torch."""
    torch, X, Y, init, loss_of = _torch_case(dtype_name, base, adaptive)
    rho, eta = (0.5, 0.01) if adaptive else (0.05, 0.0)
    tparams = [p.clone().requires_grad_(True) for p in init]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[base]
    topt = cls(tparams, foreach=False, **kw)
    nparams = [p.numpy().copy() for p in init]
    nopt = SAM(nparams, rho=rho, adaptive=adaptive, eta=eta, base=base, **kw)

    for x, y in zip(X, Y):
        # torch: per-tensor SAM / ASAM, then the torch optimizer's own step
        grads = torch.autograd.grad(loss_of(tparams, x, y), tparams)
        with torch.no_grad():
            if adaptive:
                ts = [p.abs() + eta for p in tparams]
                norm = torch.sqrt(sum(((t * gr) ** 2).sum() for t, gr in zip(ts, grads)))
                es = [rho * t * t * gr / (norm + 1e-12) for t, gr in zip(ts, grads)]
            else:
                norm = torch.sqrt(sum((gr**2).sum() for gr in grads))
                es = [rho * gr / (norm + 1e-12) for gr in grads]
            backups = [p.clone() for p in tparams]
            for p, e in zip(tparams, es):
                p.add_(e)
        grads2 = torch.autograd.grad(loss_of(tparams, x, y), tparams)
        with torch.no_grad():
            for p, b, gr in zip(tparams, backups, grads2):
                p.copy_(b)
                p.grad = gr.clone()
        topt.step()

        # numpy front
        def grad_fn(ps):
            leaves = [torch.from_numpy(p).requires_grad_(True) for p in ps]
            loss = loss_of(leaves, x, y)
            grads = torch.autograd.grad(loss, leaves)
            return loss.item(), [gr.numpy().copy() for gr in grads]

        nopt.step(grad_fn)

    tol = dict(rtol=1e-10, atol=1e-12) if dtype_name == "float64" else dict(rtol=2e-5, atol=2e-6)
    for p, t in zip(nparams, tparams):
        np.testing.assert_allclose(p, t.detach().numpy(), **tol)


# --------------------------------------------------------------------------- a real training run


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    X, y = X[order], y[order]
    return X[:1400], y[:1400], X[1400:], y[1400:]


def _mlp_loss_and_grads(params, X, y):
    W1, b1, W2, b2 = params
    h = np.maximum(X @ W1 + b1, 0.0)
    z = h @ W2 + b2
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y]).mean())
    dz = p
    dz[np.arange(n), y] -= 1.0
    dz /= n
    dh = (dz @ W2.T) * (h > 0)
    return loss, [X.T @ dh, dh.sum(axis=0), h.T @ dz, dz.sum(axis=0)]


def test_digits_mlp_trains():
    Xtr, ytr, Xte, yte = _digits()
    rng = np.random.default_rng(0)
    hidden = 64
    params = [
        (rng.normal(size=(64, hidden)) * np.sqrt(2 / 64)).astype(np.float32),
        np.zeros(hidden, np.float32),
        (rng.normal(size=(hidden, 10)) * np.sqrt(2 / hidden)).astype(np.float32),
        np.zeros(10, np.float32),
    ]
    opt = SAM(params, rho=0.05, base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    epoch_loss = []
    for _epoch in range(8):
        order = rng.permutation(len(ytr))
        losses = []
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            losses.append(opt.step(lambda ps: _mlp_loss_and_grads(ps, Xtr[idx], ytr[idx])))
        epoch_loss.append(np.mean(losses))
    assert all(p.dtype == np.float32 and np.all(np.isfinite(p)) for p in params)
    h = np.maximum(Xte @ params[0] + params[1], 0.0)
    acc = float(np.mean((h @ params[2] + params[3]).argmax(axis=1) == yte))
    assert epoch_loss[-1] < 0.5 * epoch_loss[0], epoch_loss
    assert acc > 0.85, acc
