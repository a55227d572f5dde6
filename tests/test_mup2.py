"""μP² (Haas, Xu, Cevher, Chennuru Vankadara, NeurIPS 2024, arXiv:2411.00075): the roles
:func:`sharpness.mup2_param_groups` gives, SAM with its groups against a per-tensor reference of

    ε_l = ρ·num_l · g_l / sqrt( Σ_k den_k² ‖g_k‖² )

written here from the rule (nothing from sharpness in the references), the ``m = 1`` limit (plain
SAM bit for bit), the ``sam_norm_weight`` key on every CPU engine, checkpoints, and the paper's
claim: under μP, plain SAM's perturbation stops reaching the hidden layers as the width grows,
μP²'s does not."""

from __future__ import annotations

import copy
import io
import math

import pytest
import registry
import torch
from _family import assert_close, assert_equal, batches, grads_at, loss_of
from torch import nn

import sharpness

# -- the rule, written from the table (m = width / base width) -------------------------------------


def factors(role, m, optimizer, variant):
    """(num, den, lr multiplier) of a tensor with this role."""
    if role == "input":
        return m, m**0.5, (m if optimizer == "sgd" else 1.0)
    if role == "hidden":
        return 1.0, (1.0 if variant == "decoupled" else m**-0.5), (1.0 if optimizer == "sgd" else 1.0 / m)
    if role == "output":
        return 1.0 / m, (m**-0.5 if variant == "decoupled" else m**-1.5), 1.0 / m
    assert role == "width_independent"
    return 1.0, 1.0, 1.0


def mlp(width, device=None):
    return nn.Sequential(
        nn.Linear(6, width, device=device),
        nn.Tanh(),
        nn.Linear(width, width, device=device),
        nn.Tanh(),
        nn.Linear(width, 4, device=device),
    )


MLP_ROLES = {
    "0.weight": "input",
    "0.bias": "input",
    "2.weight": "hidden",
    "2.bias": "input",
    "4.weight": "output",
    "4.bias": "width_independent",
}


class CNN(nn.Module):
    def __init__(self, w, device=None):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1, device=device)
        self.bn = nn.BatchNorm2d(w, device=device)
        self.conv = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False, device=device)
        self.ln = nn.LayerNorm(2 * w, device=device)
        self.up = nn.ConvTranspose2d(2 * w, 3, 2, device=device)  # weight (in, out, k, k): fan-in scales
        self.embed = nn.Embedding(10, w, device=device)  # weight (vocab, dim): fan-out scales
        self.head = nn.Linear(2 * w, 5, device=device)


CNN_ROLES = {
    "stem.weight": "input",
    "stem.bias": "input",
    "bn.weight": "input",
    "bn.bias": "input",
    "conv.weight": "hidden",
    "ln.weight": "input",
    "ln.bias": "input",
    "up.weight": "output",
    "up.bias": "width_independent",
    "embed.weight": "input",
    "head.weight": "output",
    "head.bias": "width_independent",
}


def roles_of(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: (g["mup2_role"], g["mup2_width_mult"]) for g in groups for p in g["params"]}


# == (a) roles ==========================================================================================


def test_roles_of_an_mlp():
    model = mlp(32)
    groups = sharpness.mup2_param_groups(model, mlp(8, device="meta"), rho=0.1, lr=0.05)
    assert roles_of(model, groups) == {n: (r, 1.0 if r == "width_independent" else 4.0) for n, r in MLP_ROLES.items()}
    assert [g["mup2_role"] for g in groups] == ["input", "hidden", "output", "width_independent"]
    for g in groups:
        num, den, lr_mult = factors(g["mup2_role"], g["mup2_width_mult"], "sgd", "decoupled")
        assert g["sam_rho"] == pytest.approx(0.1 * num, rel=1e-15)
        assert g["sam_norm_weight"] == pytest.approx(den, rel=1e-15)
        assert g["lr"] == pytest.approx(0.05 * lr_mult, rel=1e-15)


def test_roles_of_a_cnn_with_norms_an_embedding_and_a_transposed_conv():
    model = CNN(12)
    groups = sharpness.mup2_param_groups(model, CNN(4), rho=0.1, lr=0.05, optimizer="adam", variant="mpp")
    got = roles_of(model, groups)
    assert got == {n: (r, 1.0 if r == "width_independent" else 3.0) for n, r in CNN_ROLES.items()}
    hidden = next(g for g in groups if g["mup2_role"] == "hidden")
    assert hidden["lr"] == pytest.approx(0.05 / 3) and hidden["sam_norm_weight"] == pytest.approx(3**-0.5)


def test_role_overrides_and_group_kwargs():
    model = mlp(32)
    groups = sharpness.mup2_param_groups(
        model, mlp(8, device="meta"), rho=0.1, lr=0.05, roles={"2.bias": "width_independent"}, weight_decay=1e-4
    )
    assert roles_of(model, groups)["2.bias"] == ("width_independent", 4.0)
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    # Same role but another width ratio: another group.
    assert len(groups) == 5


def test_the_same_width_gives_one_group_of_ones():
    model = mlp(16)
    groups = sharpness.mup2_param_groups(model, copy.deepcopy(model), rho=0.1, lr=0.05)
    assert len(groups) == 1
    g = groups[0]
    assert (g["mup2_role"], g["sam_rho"], g["sam_norm_weight"], g["lr"]) == ("width_independent", 0.1, 1.0, 0.05)


def test_errors():
    base = mlp(8, device="meta")
    with pytest.raises(ValueError, match="same parameter names"):
        sharpness.mup2_param_groups(nn.Sequential(nn.Linear(6, 32), nn.Linear(32, 4)), base, rho=0.1, lr=0.1)
    wide = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4))
    with pytest.raises(ValueError, match="different ratios"):
        sharpness.mup2_param_groups(wide, base, rho=0.1, lr=0.1)
    odd = mlp(32)
    odd[2].weight = nn.Parameter(torch.zeros(32, 32, 1))
    with pytest.raises(ValueError, match="number of dims"):
        sharpness.mup2_param_groups(odd, base, rho=0.1, lr=0.1)
    model = mlp(32)
    for kwargs, error, match in [
        (dict(optimizer="rmsprop"), ValueError, "optimizer"),
        (dict(variant="global"), ValueError, "variant"),
        (dict(rho=-1.0), ValueError, "rho"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(roles={"*": "readout"}), ValueError, "roles"),
        (dict(sam_rho=0.3), TypeError, "sets"),
    ]:
        with pytest.raises(error, match=match):
            sharpness.mup2_param_groups(model, base, **{"rho": 0.1, "lr": 0.1, **kwargs})


# == (b) m = 1 is plain SAM ==============================================================================

BASES = {
    "sgd": (torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-3), 0.05),
    "adam": (torch.optim.Adam, dict(), 1e-2),
}


def run(opt, model, data):
    for x, y in data:

        def closure():
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("base", list(BASES))
def test_base_width_is_plain_sam_bit_for_bit(backend, base):
    cls, kw, lr = BASES[base]
    torch.manual_seed(0)
    plain = mlp(24)
    mine = copy.deepcopy(plain)
    data = batches(4)
    run(sharpness.SAM(plain.parameters(), cls, rho=0.1, backend=backend, lr=lr, **kw), plain, data)
    groups = sharpness.mup2_param_groups(mine, mlp(24, device="meta"), rho=0.1, lr=lr, optimizer=base)
    run(sharpness.SAM(groups, cls, backend=backend, **kw), mine, data)
    assert_equal(plain, mine)


# == (c) trajectories against the per-tensor reference ====================================================


def reference(model, data, rho, lr, optimizer, variant, cls, kw, m=4.0):
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    f = [factors(MLP_ROLES[n], 1.0 if MLP_ROLES[n] == "width_independent" else m, optimizer, variant) for n in names]
    base = cls([{"params": [p], "lr": lr * lr_mult} for p, (_, _, lr_mult) in zip(params, f)], foreach=False, **kw)
    for x, y in data:
        g = grads_at(model, x, y)
        norm = math.sqrt(sum(den**2 * float(gi.double().pow(2).sum()) for gi, (_, den, _) in zip(g, f)))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi, (num, _, _) in zip(params, g, f):
                p.add_(gi * (rho * num / (norm + 1e-12)))
        gp = grads_at(model, x, y)
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        for p, gi in zip(params, gp):
            p.grad = gi
        base.step()


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("variant", ["decoupled", "mpp"])
@pytest.mark.parametrize("base", list(BASES))
def test_trajectory_matches_the_per_tensor_reference(backend, variant, base):
    cls, kw, lr = BASES[base]
    torch.manual_seed(0)
    ref = mlp(32)
    mine = copy.deepcopy(ref)
    data = batches(6)
    reference(ref, data, 0.1, lr, base, variant, cls, kw)
    groups = sharpness.mup2_param_groups(mine, mlp(8, device="meta"), rho=0.1, lr=lr, optimizer=base, variant=variant)
    opt = sharpness.SAM(groups, cls, backend=backend, **kw)
    run(opt, mine, data)
    assert_close(ref, mine, rtol=1e-5, atol=1e-6)
    if backend == "rust":
        assert opt.stats["fused_steps"] == len(data)


# == (d) sam_norm_weight on its own ========================================================================


def three_groups(model, weights):
    ps = list(model.parameters())
    return [
        {"params": ps[:2], "sam_norm_weight": weights[0]},
        {"params": ps[2:4], "sam_norm_weight": weights[1], "sam_rho": 0.3},
        {"params": ps[4:], "sam_norm_weight": weights[2], "sam_adaptive": True, "sam_rho": 0.5},
    ]


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_norm_weight_weighs_each_group_in_the_norm(backend):
    torch.manual_seed(0)
    model = mlp(16).double()
    weights = (1.0, 3.0, 0.25)
    opt = sharpness.SAM(three_groups(model, weights), torch.optim.SGD, rho=0.1, eta=0.01, backend=backend, lr=0.1)
    x, y = batches(1)[0]
    g = grads_at(model, x.double(), y)
    w0 = [p.detach().clone() for p in model.parameters()]
    t = [torch.ones_like(p) for p in w0[:4]] + [p.abs() + 0.01 for p in w0[4:]]  # ASAM's T in group 3
    c = [weights[0]] * 2 + [weights[1]] * 2 + [weights[2]] * 2
    want = math.sqrt(sum(ci**2 * float((ti * gi).pow(2).sum()) for ci, ti, gi in zip(c, t, g)))
    opt.zero_grad()
    loss_of(model, x.double(), y).backward()
    opt.first_step()
    assert opt.last_grad_norm == pytest.approx(want, rel=1e-12)
    rhos = [0.1, 0.1, 0.3, 0.3, 0.5, 0.5]
    for p, w, gi, ti, rho in zip(model.parameters(), w0, g, t, rhos):
        torch.testing.assert_close(p.detach() - w, rho * ti**2 * gi / want, rtol=1e-9, atol=1e-15)
    report = opt.perturbation_report()  # recomputes e from last_grad_norm: the weighted norm
    assert report["relative_error"] < 1e-12
    opt.restore()


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_norm_weight_one_is_bit_for_bit_the_same(backend):
    torch.manual_seed(0)
    a = mlp(16)
    b = copy.deepcopy(a)
    data = batches(3)
    groups_a = three_groups(a, (1.0, 1.0, 1.0))
    groups_b = [{k: v for k, v in g.items() if k != "sam_norm_weight"} for g in three_groups(b, (1.0,) * 3)]
    run(sharpness.SAM(groups_a, torch.optim.SGD, backend=backend, lr=0.1, momentum=0.9), a, data)
    run(sharpness.SAM(groups_b, torch.optim.SGD, backend=backend, lr=0.1, momentum=0.9), b, data)
    assert_equal(a, b)


def test_norm_weight_is_validated():
    model = mlp(8)
    for bad in [0.0, -1.0, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="sam_norm_weight"):
            sharpness.SAM([{"params": model.parameters(), "sam_norm_weight": bad}], torch.optim.SGD, lr=0.1)
    opt = sharpness.SAM(list(model.parameters())[:2], torch.optim.SGD, lr=0.1)
    assert opt.param_groups[0]["sam_norm_weight"] == 1.0
    with pytest.raises(ValueError, match="sam_norm_weight"):
        opt.add_param_group({"params": list(model.parameters())[2:], "sam_norm_weight": -2.0})


# == (e) checkpoints ===========================================================================================


def test_state_dict_round_trip_keeps_the_group_keys():
    torch.manual_seed(0)
    model = mlp(32)
    data = batches(4)
    groups = sharpness.mup2_param_groups(model, mlp(8, device="meta"), rho=0.1, lr=1e-2, optimizer="adam")
    opt = sharpness.SAM(groups, torch.optim.Adam)
    run(opt, model, data[:2])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)

    twin = copy.deepcopy(model)
    other = sharpness.mup2_param_groups(twin, mlp(16, device="meta"), rho=0.0, lr=1.0, optimizer="adam")
    opt2 = sharpness.SAM(other, torch.optim.Adam)
    opt2.load_state_dict(sd)
    keys = ("sam_rho", "sam_norm_weight", "lr", "mup2_role", "mup2_width_mult")
    for g1, g2 in zip(opt.param_groups, opt2.param_groups):
        assert {k: g1[k] for k in keys} == {k: g2[k] for k in keys}
    run(opt, model, data[2:])
    run(opt2, twin, data[2:])
    assert_equal(model, twin)

    # A checkpoint from before the key existed loads with the default weight 1.
    old = copy.deepcopy(sd)
    for g in old["param_groups"]:
        del g["sam_norm_weight"]
    opt2.load_state_dict(old)
    assert all(g["sam_norm_weight"] == 1.0 for g in opt2.param_groups)


# == (f) the width claim ====================================================================================


def deep_mlp(width, device=None):
    return nn.Sequential(
        nn.Linear(16, width, device=device),
        nn.ReLU(),
        nn.Linear(width, width, device=device),
        nn.ReLU(),
        nn.Linear(width, width, device=device),
        nn.ReLU(),
        nn.Linear(width, 4, device=device),
    )


def perturbation_effects(width, mup2, base_width=64, rho=0.1):
    """RMS of ``ε_W h + ε_b`` per layer (the change of its pre-activations that the perturbation
    causes on the unperturbed inputs) at the first SAM step of an MLP in μP."""
    model = deep_mlp(width).double()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # μP init: std 1/sqrt(fan_in), the output layer std 1/fan_in
        for i, lin in enumerate(linears):
            std = 1.0 / lin.in_features if i == len(linears) - 1 else lin.in_features**-0.5
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=torch.float64) * std)
            lin.bias.zero_()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (64,), generator=gen)
    if mup2:
        groups = sharpness.mup2_param_groups(model, deep_mlp(base_width, device="meta"), rho=rho, lr=0.1)
        opt = sharpness.SAM(groups, torch.optim.SGD)
    else:
        opt = sharpness.SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    inputs = []
    hooks = [lin.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach())) for lin in linears]
    loss = nn.functional.cross_entropy(model(x), y)
    for h in hooks:
        h.remove()
    before = [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in linears]
    loss.backward()
    opt.first_step(zero_grad=True)
    with torch.no_grad():
        effects = [
            float((nn.functional.linear(h, lin.weight, lin.bias) - nn.functional.linear(h, w, b)).pow(2).mean().sqrt())
            for lin, (w, b), h in zip(linears, before, inputs)
        ]
    opt.restore()
    return effects


def test_hidden_layers_stay_perturbed_with_width_only_under_mup2():
    widths = [64, 256, 1024]
    plain = {w: perturbation_effects(w, mup2=False) for w in widths}
    mup2 = {64: plain[64], **{w: perturbation_effects(w, mup2=True) for w in widths[1:]}}  # m = 1: SAM

    def hidden_share(e):
        return max(e[1:-1]) / max(e)

    # Plain SAM: the last layer takes over (its effect grows like sqrt(width), the hidden layers'
    # falls like 1/sqrt(width)): the hidden share falls ~16x from 64 to 1024 (measured ~25x).
    assert hidden_share(plain[1024]) < hidden_share(plain[64]) / 8
    assert plain[1024][-1] > 2 * plain[64][-1]
    # μP²: every layer's effect, and so the hidden share, stays within a constant factor
    # (measured: within 0.6-1.3x).
    assert hidden_share(mup2[64]) / 2.5 < hidden_share(mup2[1024]) < 2.5 * hidden_share(mup2[64])
    for layer in range(4):
        values = [mup2[w][layer] for w in widths]
        assert max(values) < 2.5 * min(values), (layer, values)


@pytest.mark.parametrize("name", registry.labels(lambda e: not e.norm_weights))
def test_variants_with_norms_of_their_own_refuse_norm_weights(name):
    """The registry's methods whose norms are their own (``norm_weights_supported`` False)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    params = list(model.parameters())
    groups = [{"params": params[:2]}, {"params": params[2:], "sam_norm_weight": 0.5}]
    opt = registry.get(name).torch(groups, torch.optim.SGD, base_kwargs=dict(lr=0.1))
    w0 = [p.detach().clone() for p in params]

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(2, 3)).square().sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="sam_norm_weight"):
        registry.begin(opt)
        opt.step(closure)
    assert all(torch.equal(p, w) for p, w in zip(params, w0))
