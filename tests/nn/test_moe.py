"""zoo.nn.moe.MoE: token-choice and expert-choice routing (hard and relaxed top-k) against Python-loop routing
references and a dense all-experts reference, capacity, padding, aux loss, stats, upcycling, training, autocast,
torch.compile and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from zoo.errors import ZooError
from zoo.nn.moe import MoE, routing_statistics
from zoo.ops.topk import soft_topk_mask

DIM, HIDDEN, E = 8, 16, 4


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def padding(lengths: list[int], T: int) -> torch.Tensor:
    """(B, T) bool, True = padded, for sequences of the given lengths."""
    return torch.arange(T).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)


def make(seed: int = 0, **kwargs: object) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(DIM, HIDDEN, kwargs.pop("num_experts", E), **kwargs).eval()
    with torch.no_grad():  # a router strong enough that gates differ clearly between tokens
        moe.router.weight.mul_(3.0)
    return moe


# ------------------------------------------------------------------------------------------------ references


def reference_weights(moe: MoE, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense (N, E) combine weights by the published routing rules, written with Python loops over tokens,
    choices, groups and experts (padded tokens simply left out)."""
    flat = x.reshape(-1, moe.dim)
    N, n_exp = flat.shape[0], moe.num_experts
    valid = [True] * N if padding_mask is None else (~padding_mask.reshape(-1)).tolist()
    gates = torch.softmax(flat @ moe.router.weight.t(), dim=-1)
    soft = {"p": moe.p, "lam": moe.lam, "solver": moe.solver, "dykstra_iters": moe.dykstra_iters}
    R = torch.zeros(N, n_exp)
    if moe.router_type == "token_choice":
        k = moe.k
        w = gates * soft_topk_mask(gates, k, dim=-1, **soft) if moe.topk == "soft" else gates
        values, experts = torch.topk(w, k, dim=-1)
        n_valid = sum(valid)
        cap = N if moe.capacity_factor is None else math.ceil(n_valid * moe.capacity_factor * k / n_exp)
        count = [0] * n_exp
        for j in range(k):  # GShard priority: every first choice, in token order, before any second choice
            for t in range(N):
                e = int(experts[t, j])
                if valid[t] and count[e] < cap:
                    count[e] += 1
                    R[t, e] = values[t, j] / values[t].sum() if moe.normalize_gates else values[t, j]
        return R
    if moe.group_size is None:
        T = x.shape[-2]
        groups = [list(range(g * T, (g + 1) * T)) for g in range(N // T)]
    else:
        groups = [list(range(s, min(s + moe.group_size, N))) for s in range(0, N, moe.group_size)]
    for group in groups:
        tokens = [t for t in group if valid[t]]
        n = len(tokens)
        if n == 0:
            continue
        if moe.k is not None:
            k = min(moe.k, n)
        elif moe.capacity_factor is None:
            k = n
        else:
            k = min(max(1, round(n * moe.capacity_factor / n_exp)), n)
        for e in range(n_exp):
            s = gates[tokens, e]
            w = s * soft_topk_mask(s, k, **soft) if moe.topk == "soft" else s
            top = torch.topk(w, k).indices
            R[[tokens[i] for i in top.tolist()], e] = w[top]
    return R


def dense_reference(moe: MoE, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then weighted by the (N, E) routing weights."""
    flat = x.reshape(-1, moe.dim)
    ex = moe.experts
    out = torch.zeros_like(flat)
    for e in range(moe.num_experts):
        h = F.gelu(F.linear(flat, ex.fc1.weight[e], ex.fc1.bias[e]))
        out = out + R[:, e : e + 1] * F.linear(h, ex.fc2.weight[e], ex.fc2.bias[e])
    return out.view(x.shape)


def routing_matrix(moe: MoE, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The module's dispatch (MoE.route) as a dense (N, E) matrix; also checks no (token, expert) pair twice."""
    r = moe.route(x, padding_mask)
    N = x.reshape(-1, moe.dim).shape[0]
    R = torch.zeros(N + 1, moe.num_experts)
    hits = torch.zeros(N + 1, moe.num_experts)
    for e in range(moe.num_experts):
        R[r.index[e], e] += r.weight[e].detach()
        hits[r.index[e], e] += 1
    assert hits[:N].max() <= 1, "a token dispatched twice to one expert"
    assert R[N].abs().max() == 0, "empty slots carry weight"
    return R[:N]


ROUTINGS = {
    "token_k1": {"router": "token_choice"},
    "token_k2_cap1": {"router": "token_choice", "k": 2, "capacity_factor": 1.0},
    "token_k2_nolimit_unnormalised": {
        "router": "token_choice",
        "k": 2,
        "capacity_factor": None,
        "normalize_gates": False,
    },
    "token_k2_soft": {"router": "token_choice", "k": 2, "topk": "soft", "lam": 0.05},
    "token_k1_soft": {"router": "token_choice", "topk": "soft", "lam": 0.05},
    "expert": {"router": "expert_choice"},
    "expert_k3": {"router": "expert_choice", "k": 3},
    "expert_cf1_group5": {"router": "expert_choice", "capacity_factor": 1.0, "group_size": 5},
    "expert_soft": {"router": "expert_choice", "topk": "soft", "lam": 0.05},
    "expert_soft_k3": {"router": "expert_choice", "k": 3, "topk": "soft", "lam": 0.05},
}


@pytest.mark.parametrize("name", ROUTINGS)
def test_routing_and_output_match_loop_references(name: str) -> None:
    moe = make(**ROUTINGS[name])
    x = seeded(3, 11, DIM)
    pm = padding([11, 7, 4], 11)
    R = reference_weights(moe, x, pm)
    torch.testing.assert_close(routing_matrix(moe, x, pm), R, rtol=1e-5, atol=1e-6)
    out = moe(x, pm)
    assert out.shape == x.shape
    torch.testing.assert_close(out, dense_reference(moe, x, R), rtol=1e-5, atol=1e-5)
    assert out[pm].abs().max() == 0  # padded rows exactly zero
    # and without padding
    torch.testing.assert_close(moe(x), dense_reference(moe, x, reference_weights(moe, x)), rtol=1e-5, atol=1e-5)


def test_soft_router_weights_differ_from_hard() -> None:
    """The relaxed weights m * S are not the hard ones at a moderate lam (the references above can fail)."""
    x = seeded(2, 11, DIM)
    for router in ("token_choice", "expert_choice"):
        k = {"k": 2} if router == "token_choice" else {}
        hard, soft = make(router=router, **k), make(router=router, topk="soft", lam=0.05, **k)
        assert (routing_matrix(hard, x) - routing_matrix(soft, x)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ capacity


@pytest.mark.parametrize("k,capacity_factor", [(1, 1.0), (1, 0.5), (2, 1.25), (3, 0.75)])
def test_token_choice_capacity(k: int, capacity_factor: float) -> None:
    moe = make(router="token_choice", k=k, capacity_factor=capacity_factor)
    with torch.no_grad():  # unbalanced router: expert 0 is everyone's favourite, so capacity binds
        moe.router.weight[0] += 2 * seeded(DIM, seed=5)
    x = seeded(2, 16, DIM, seed=1) + seeded(DIM, seed=5)
    pm = padding([16, 9], 16)
    r = moe.route(x, pm)
    assert r.capacity == math.ceil(32 * capacity_factor * k / E)  # static buffer from all B * T tokens
    cap = math.ceil(25 * capacity_factor * k / E)  # effective capacity from the valid tokens
    filled = (r.index < 32).sum(1)
    assert filled.max() <= cap
    padded_tokens = pm.reshape(-1).nonzero().flatten()
    assert not torch.isin(r.index, padded_tokens).any()
    moe(x, pm)
    assert torch.equal(moe.stats["tokens_per_expert"], filled)
    dropped = 1 - filled.sum() / (25 * k)
    torch.testing.assert_close(moe.stats["dropped_fraction"], dropped.float())
    if capacity_factor <= 1.0:
        assert moe.stats["dropped_fraction"] > 0  # this router overloads expert 0


def test_token_choice_without_capacity_drops_nothing() -> None:
    moe = make(router="token_choice", k=2, capacity_factor=None)
    x = seeded(2, 9, DIM)
    r = moe.route(x)
    assert r.capacity == 18
    assert int((r.index < 18).sum()) == 2 * 18
    moe(x)
    assert moe.stats["dropped_fraction"] == 0


@pytest.mark.parametrize("kwargs", [{}, {"k": 3}, {"capacity_factor": 1.5}, {"group_size": 6}])
def test_expert_choice_every_expert_takes_exactly_k_tokens(kwargs: dict) -> None:
    moe = make(router="expert_choice", **kwargs)
    x = seeded(3, 12, DIM)
    r = moe.route(x)
    n = kwargs.get("group_size", 12)
    groups = 36 // n
    k = kwargs.get("k") or round(kwargs.get("capacity_factor", 2.0) * n / E)
    assert r.capacity == groups * k
    assert torch.equal((r.index < 36).sum(1), torch.full((E,), groups * k))
    for g in range(groups):  # k distinct tokens of the group per expert
        block = r.index[:, g * k : (g + 1) * k]
        assert ((block >= g * n) & (block < (g + 1) * n)).all()
        assert all(len(set(row.tolist())) == k for row in block)
    # with padding: k_g = min(k, round(capacity_factor * n_valid / E)) per sequence, slots past it empty
    if "group_size" not in kwargs:
        lengths = [12, 5, 1]
        r = moe.route(x, padding(lengths, 12))
        for g, length in enumerate(lengths):
            kg = (
                min(kwargs["k"], length)
                if "k" in kwargs
                else min(max(1, round(kwargs.get("capacity_factor", 2.0) * length / E)), length)
            )
            block = r.index[:, g * k : (g + 1) * k]
            assert torch.equal((block < 36).sum(1), torch.full((E,), kg))


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_experts_run_on_a_buffer_sized_by_capacity_not_by_experts(router: str) -> None:
    """The experts' batched matmuls see (E, C, dim) with E * C about capacity_factor * k * T for every E (no
    dense all-experts compute)."""
    x = seeded(2, 24, DIM)
    for num_experts in (2, 4, 8, 16):
        moe = make(router=router, num_experts=num_experts, capacity_factor=1.0)
        shapes: list[tuple[int, ...]] = []
        moe.experts.register_forward_hook(lambda mod, args, out, seen=shapes: seen.append(tuple(args[0].shape)))
        moe(x)
        (shape,) = shapes
        assert shape[0] == num_experts and shape[2] == DIM
        assert 48 <= shape[0] * shape[1] <= 48 + 2 * num_experts


# ------------------------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("name", ["expert", "expert_k3", "expert_soft", "token_k2_nolimit_unnormalised"])
def test_padded_batch_equals_each_sequence_alone(name: str) -> None:
    moe = make(**ROUTINGS[name])
    lengths = [10, 6, 3]
    x = seeded(3, 10, DIM)
    pm = padding(lengths, 10)
    x = x.masked_fill(pm.unsqueeze(-1), 1e3)  # garbage in the padded positions must not matter
    out = moe(x, pm)
    assert out[pm].abs().max() == 0
    for b, length in enumerate(lengths):
        alone = moe(x[b : b + 1, :length])
        torch.testing.assert_close(out[b : b + 1, :length], alone, rtol=1e-5, atol=1e-6)
    residual = x + out
    assert torch.equal(residual[pm], x[pm])


@pytest.mark.parametrize(
    "name", ["token_k1", "token_k2_cap1", "token_k2_soft", "expert", "expert_k3", "expert_soft", "expert_cf1_group5"]
)
def test_nan_and_inf_in_padded_tokens_change_nothing(name: str) -> None:
    """Padded tokens never reach the router's matmul nor the experts: NaN / inf there give exactly what zeros
    there give (output, aux loss, gradients of router, experts and input), the padded output rows and input
    gradient rows are exactly 0, and everything is finite. (A NaN pad made the router's gradient NaN, and the
    token-choice aux loss NaN.)"""
    pm = padding([10, 6, 3], 10)
    clean = seeded(3, 10, DIM).masked_fill(pm.unsqueeze(-1), 0.0)
    dirty = clean.clone()
    dirty[1, 6:] = float("nan")
    dirty[2, 3:5] = float("inf")
    dirty[2, 5:] = -float("inf")
    results = []
    for x in (clean, dirty):
        moe = make(**ROUTINGS[name], router_bias=True).train()
        leaf = x.clone().requires_grad_(True)
        out = moe(leaf, pm)
        target = seeded(3, 10, DIM, seed=1)
        (F.mse_loss(out, target, reduction="sum") + moe.aux_loss).backward()
        results.append((out.detach(), moe.aux_loss.detach(), leaf.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (out_c, aux_c, gx_c, grads_c), (out_d, aux_d, gx_d, grads_d) = results
    assert torch.equal(out_d, out_c) and torch.equal(aux_d, aux_c) and torch.isfinite(aux_d)
    assert torch.equal(out_d[pm], torch.zeros_like(out_d[pm]))
    assert torch.equal(gx_d, gx_c) and torch.equal(gx_d[pm], torch.zeros_like(gx_d[pm]))
    for pname, g in grads_d.items():
        assert torch.isfinite(g).all() and torch.equal(g, grads_c[pname]), pname
    assert grads_d["router.weight"].abs().sum() > 0


def test_unbatched_input_equals_batch_of_one() -> None:
    for name in ("token_k2_cap1", "expert"):
        moe = make(**ROUTINGS[name])
        x = seeded(9, DIM)
        torch.testing.assert_close(moe(x), moe(x.unsqueeze(0)).squeeze(0))
        pm = torch.arange(9) >= 6
        torch.testing.assert_close(moe(x, pm), moe(x.unsqueeze(0), pm.unsqueeze(0)).squeeze(0))


# ------------------------------------------------------------------------------------------------ aux loss, stats


def test_token_choice_aux_loss_matches_switch_formula() -> None:
    for k in (1, 2):
        moe = make(router="token_choice", k=k, capacity_factor=1.0)
        x = seeded(2, 10, DIM)
        pm = padding([10, 4], 10)
        moe.train()
        moe(x, pm)
        flat, valid = x.reshape(-1, DIM), ~pm.reshape(-1)
        gates = torch.softmax(flat[valid] @ moe.router.weight.t(), -1)
        chosen = torch.topk(gates, k, -1).indices
        f = torch.stack([(chosen == e).sum() for e in range(E)]).float() / (k * valid.sum())
        expected = E * (f * gates.mean(0)).sum()
        torch.testing.assert_close(moe.aux_loss, expected)
        assert moe.aux_loss.requires_grad
        moe.aux_loss.backward()
        assert moe.router.weight.grad.abs().sum() > 0
    # balanced routing gives 1: identical tokens spread evenly is impossible, so check the uniform-gate case
    moe = make(router="token_choice")
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(seeded(2, 8, DIM))
    torch.testing.assert_close(moe.aux_loss, torch.tensor(1.0))


@pytest.mark.parametrize("topk", ["hard", "soft"])
def test_expert_choice_aux_loss_is_zero(topk: str) -> None:
    moe = make(router="expert_choice", topk=topk).train()
    moe(seeded(2, 10, DIM), padding([10, 3], 10))
    assert moe.aux_loss.item() == 0.0


@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0,)], ids=["no_sequence", "empty_sequences", "no_token_2d"])
def test_a_call_without_tokens_gives_an_empty_output_and_drops_nothing(name: str, shape: tuple[int, ...]) -> None:
    """A call with no token (an empty batch, empty sequences) or only padded tokens runs, returns zeros of x's
    shape, gives x and every parameter a (zero) gradient, and reports nothing dropped: there was nothing to route
    (expert choice with the relaxed top-k asked soft_topk_mask for k = 0 of n = 0 and raised; dropped_fraction was
    reported as 1)."""
    moe = make(**ROUTINGS[name]).train()
    cases = [(seeded(*shape, DIM).requires_grad_(), None)]
    if shape == (0, 5):  # and a batch whose every token is padded
        cases.append((seeded(2, 5, DIM).requires_grad_(), torch.ones(2, 5, dtype=torch.bool)))
    for x, pm in cases:
        out = moe(x, pm)
        assert out.shape == x.shape and (out.numel() == 0 or out.abs().max() == 0)
        (out.sum() + moe.aux_loss).backward()
        assert x.grad is not None and (x.grad.numel() == 0 or x.grad.abs().max() == 0)
        assert moe.stats["dropped_fraction"] == 0
        assert moe.stats["tokens_per_expert"].sum() == 0
        if "dropped_soft_weight" in moe.stats:
            assert moe.stats["dropped_soft_weight"] == 0
        moe.zero_grad()


def test_stats_are_detached_and_correct() -> None:
    moe = make(router="expert_choice", topk="soft", lam=0.05).train()
    x = seeded(2, 10, DIM)
    pm = padding([10, 3], 10)
    out = moe(x, pm)
    assert set(moe.stats) == {"tokens_per_expert", "dropped_fraction", "router_entropy", "dropped_soft_weight"}
    assert all(not v.requires_grad for v in moe.stats.values())
    valid = ~pm.reshape(-1)
    gates = torch.softmax(x.reshape(-1, DIM)[valid] @ moe.router.weight.t(), -1)
    entropy = -(gates * gates.log()).sum(-1).mean()
    torch.testing.assert_close(moe.stats["router_entropy"], entropy)
    R = reference_weights(moe, x, pm)
    # tokens per expert: 5 (=round(2 * 10 / 4)) + 2 (=round(1.5)) per expert
    assert torch.equal(moe.stats["tokens_per_expert"], torch.full((E,), 7))
    routed = (routing_matrix(moe, x, pm) > 0).any(-1)[valid]
    torch.testing.assert_close(moe.stats["dropped_fraction"], 1 - routed.float().mean())
    # the relaxed weight outside the dispatched tokens
    full = torch.zeros(20, E)
    for g, length in enumerate([10, 3]):
        s = gates[g * 10 : g * 10 + length]
        k = 5 if length == 10 else 2
        full[g * 10 : g * 10 + length] = s * soft_topk_mask(
            s, k, dim=0, p=2.0, lam=0.05, solver="dykstra", dykstra_iters=10
        )
    torch.testing.assert_close(moe.stats["dropped_soft_weight"], 1 - R.sum() / full.sum(), rtol=1e-4, atol=1e-6)
    assert out.shape == x.shape


# ------------------------------------------------------------------------------------------------ upcycling


@pytest.mark.parametrize(
    "options",
    [
        {"router": "token_choice", "normalize_gates": True, "capacity_factor": None},
        {"router": "token_choice", "k": 2, "capacity_factor": None},
        {"router": "token_choice", "k": 3, "capacity_factor": None},
        {"router": "expert_choice", "capacity_factor": 4},
        {"router": "expert_choice", "capacity_factor": None},
    ],
)
def test_upcycled_moe_equals_the_dense_mlp(options: dict) -> None:
    torch.manual_seed(0)
    mlp = Mlp(DIM, HIDDEN).eval()
    moe = MoE.from_mlp(mlp, E, **options)
    assert not moe.training
    x = seeded(3, 7, DIM)
    torch.testing.assert_close(moe(x), mlp(x), rtol=1e-6, atol=1e-6)
    # padded tokens: zero rows; valid tokens still the MLP
    pm = padding([7, 5, 2], 7)
    out = moe(x, pm)
    torch.testing.assert_close(out[~pm], mlp(x)[~pm], rtol=1e-6, atol=1e-6)
    assert out[pm].abs().max() == 0
    # the experts are copies, not the MLP's parameters
    assert moe.experts.fc1.weight.data_ptr() != mlp.fc1.weight.data_ptr()


def test_upcycled_with_default_token_choice_scales_by_one_over_e() -> None:
    torch.manual_seed(0)
    mlp = Mlp(DIM, HIDDEN).eval()
    moe = MoE.from_mlp(mlp, E, capacity_factor=None)  # k=1, no normalisation: weight S = 1/E
    x = seeded(2, 5, DIM)
    torch.testing.assert_close(moe(x), mlp(x) / E)


def test_from_mlp_rejects_other_mlps() -> None:
    with pytest.raises(ZooError, match="exact GELU"):
        MoE.from_mlp(Mlp(DIM, HIDDEN, act_layer=nn.ReLU), E)
    with pytest.raises(ZooError, match="exact GELU"):
        MoE.from_mlp(Mlp(DIM, HIDDEN, act_layer=lambda: nn.GELU(approximate="tanh")), E)
    with pytest.raises(ZooError, match="nn.Linear fc1 and fc2"):
        MoE.from_mlp(nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM)), E)
    with pytest.raises(ZooError, match="hidden norm"):
        MoE.from_mlp(Mlp(DIM, HIDDEN, norm_layer=nn.LayerNorm), E)
    with pytest.raises(ZooError, match="dim -> hidden"):
        MoE.from_mlp(Mlp(DIM, HIDDEN, out_features=4), E)
    moe = MoE.from_mlp(Mlp(DIM, HIDDEN, bias=(True, False), drop=0.1), E)
    assert moe.experts.fc2.bias is None and moe.experts.drop1.p == 0.1


# ------------------------------------------------------------------------------------------------ relaxed top-k


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_soft_router_tends_to_the_hard_one(router: str) -> None:
    k = {"k": 2} if router == "token_choice" else {}
    hard = make(router=router, **k)
    x = seeded(3, 10, DIM)
    pm = padding([10, 8, 5], 10)
    expected_routing, expected = hard.route(x, pm), hard(x, pm)
    for lam, tol in ((1e-3, 1e-6), (1e-5, 1e-6)):
        soft = make(router=router, topk="soft", lam=lam, **k)
        r = soft.route(x, pm)
        assert torch.equal(r.index, expected_routing.index)
        torch.testing.assert_close(r.weight, expected_routing.weight, rtol=0, atol=tol)
        torch.testing.assert_close(soft(x, pm), expected, rtol=0, atol=tol)


@pytest.mark.parametrize(
    "name", ["token_k1", "token_k2_cap1", "token_k1_soft", "token_k2_soft", "expert", "expert_soft"]
)
def test_router_gradient_matches_the_reference(name: str) -> None:
    """d loss / d router weight equals that of the loop reference, which differentiates through S and, for
    topk='soft', through the relaxed mask m; with the soft router it differs from the hard router's."""
    x = seeded(2, 10, DIM)
    pm = padding([10, 7], 10)
    moe = make(**ROUTINGS[name])
    moe(x, pm).square().sum().backward()
    grad = moe.router.weight.grad.clone()
    moe.zero_grad()
    dense_reference(moe, x, reference_weights(moe, x, pm)).square().sum().backward()
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, moe.router.weight.grad, rtol=1e-4, atol=1e-5)
    if ROUTINGS[name].get("topk") == "soft":
        hard = make(**{key: v for key, v in ROUTINGS[name].items() if key not in ("topk", "lam")})
        hard(x, pm).square().sum().backward()
        assert (hard.router.weight.grad - grad).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["token_k2_cap1", "token_k2_soft", "expert_cf1_group5", "expert_soft"])
def test_float64_gradients_pass_gradcheck(name: str) -> None:
    """Dispatch, expert MLPs and combine (hard, or relaxed top-k solved exactly by PAV) against central finite
    differences in float64, for the input and every parameter of a tiny MoE, with a padded sequence."""
    options = {**ROUTINGS[name], "group_size": 3} if "group_size" in ROUTINGS[name] else dict(ROUTINGS[name])
    if options.get("topk") == "soft":
        options.update(lam=0.5, solver="pav")  # exact (no truncated iterations); a relaxation finite differences see
    torch.manual_seed(0)
    moe = MoE(3, 4, 3, dtype=torch.float64, **options)
    names = [n for n, _ in moe.named_parameters()]
    x = seeded(2, 4, 3).double().requires_grad_(True)
    pm = padding([4, 3], 4)
    params = [p.detach().clone().requires_grad_(True) for p in moe.parameters()]

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(moe, dict(zip(names, ps)), (x, pm))

    assert torch.autograd.gradcheck(f, (x, *params))


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("name", ["token_k1", "token_k2_cap1", "expert", "expert_soft"])
def test_adam_steps_lower_a_regression_loss(name: str) -> None:
    moe = make(**ROUTINGS[name]).train()
    torch.manual_seed(1)
    teacher = Mlp(DIM, 32)
    x = seeded(4, 16, DIM)
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(moe(x), target)
        losses.append(loss.item())
        opt.zero_grad()
        (loss + 0.01 * moe.aux_loss).backward()
        opt.step()
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("name", ["token_k1", "token_k2_cap1", "expert_soft"])
def test_every_parameter_gets_a_gradient_even_for_an_empty_expert(name: str) -> None:
    """DDP needs a gradient for every parameter every step: an expert that gets no token still runs."""
    moe = make(**ROUTINGS[name], router_bias=True)
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))  # token choice: everyone wants expert 0
    x = seeded(2, 6, DIM)
    moe(x, padding([6, 2], 6)).sum().backward()
    for pname, param in moe.named_parameters():
        assert param.grad is not None, pname
    if name == "token_k1":
        assert moe.stats["tokens_per_expert"][1:].sum() == 0  # experts 1..3 empty, and still got grads


# ------------------------------------------------------------------------------------------------ dtypes, compile


@pytest.mark.parametrize("name", ["token_k2_cap1", "expert", "expert_soft"])
def test_bf16_autocast(name: str) -> None:
    moe = make(**ROUTINGS[name]).train()
    x = seeded(2, 10, DIM)
    pm = padding([10, 6], 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x, pm)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert out[pm].abs().max() == 0
    (out.float().square().mean() + moe.aux_loss).backward()
    assert moe.aux_loss.dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in moe.parameters())
    torch.testing.assert_close(out.float(), moe(x, pm).detach(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("name,fullgraph", [("token_k2_cap1", True), ("expert", True), ("expert_soft", False)])
def test_compiles_and_matches_eager(name: str, fullgraph: bool) -> None:
    """The hard routers compile with fullgraph=True: no graph break, so no host sync and no data-dependent shape
    (backend aot_eager: the tracing without inductor's codegen, fast). The relaxed top-k's per-row k check is a
    host sync on the CPU (an async assert on accelerators), so soft expert choice with padding breaks there."""
    torch._dynamo.reset()
    moe = make(**ROUTINGS[name]).train()
    compiled = torch.compile(moe, fullgraph=fullgraph, backend="aot_eager")
    x = seeded(2, 10, DIM)
    pm = padding([10, 6], 10)
    out = compiled(x, pm)
    (out.square().sum() + moe.aux_loss).backward()
    grads = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    eager = moe(x, pm)
    (eager.square().sum() + moe.aux_loss).backward()
    torch.testing.assert_close(out, eager)
    for g, p in zip(grads, moe.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["token_k2_cap1", "expert"])
def test_inductor_compile_matches_eager(name: str) -> None:
    """The default backend (inductor), fullgraph=False; about 10 s each on 2 cores."""
    torch._dynamo.reset()
    moe = make(**ROUTINGS[name]).eval()
    x = seeded(2, 10, DIM)
    pm = padding([10, 6], 10)
    torch.testing.assert_close(torch.compile(moe)(x, pm), moe(x, pm), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"router": "random"}, "unknown router"),
        ({"topk": "sparse"}, "unknown topk"),
        ({"k": 0}, "k must be an integer >= 1"),
        ({"router": "expert_choice", "k": 0}, "k must be an integer >= 1"),
        ({"k": 5}, "exceeds num_experts"),
        ({"capacity_factor": 0.0}, "capacity_factor must be"),
        ({"router": "expert_choice", "capacity_factor": -1.0}, "capacity_factor must be"),
        ({"num_experts": 0}, "num_experts must be"),
        ({"lam": 0.1}, "only apply with topk='soft'"),
        ({"dykstra_iters": 10}, "dykstra_iters only apply with topk='soft'"),
        ({"topk": "soft", "dykstra_iters": 0}, "dykstra_iters must be an int >= 1"),
        ({"topk": "soft", "k": 4}, "nothing to relax"),
        ({"topk": "soft", "normalize_gates": True}, "no gradient"),
        ({"topk": "soft", "solver": "sinkhorn"}, "unknown solver"),
        ({"topk": "soft", "solver": "dykstra", "p": 4 / 3}, "dykstra' supports p = 2 only"),
        ({"topk": "soft", "lam": 0.0}, "lam must be a finite float > 0"),
        ({"topk": "soft", "p": 1.5, "solver": "pav"}, "p = 1.5 is not implemented"),
        ({"group_size": 4}, "expert choice only"),
        ({"router": "expert_choice", "k": 2, "capacity_factor": 1.0}, "not both"),
        ({"router": "expert_choice", "normalize_gates": True}, "token choice only"),
    ],
)
def test_bad_options_raise_one_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ZooError, match=match):
        MoE(DIM, HIDDEN, kwargs.pop("num_experts", E), **kwargs)


def test_n_iter_is_the_deprecated_name_of_dykstra_iters() -> None:
    """MoE(n_iter=) (the old name) sets the router's Dykstra iterations, with a FutureWarning naming dykstra_iters:
    the same routing as the new name (and not the default 10's); .n_iter reads .dykstra_iters (warning); both
    names given is one ZooError."""
    x = seeded(2, 11, DIM)
    soft = {"router": "expert_choice", "topk": "soft", "lam": 0.05, "solver": "dykstra"}
    new = make(**soft, dykstra_iters=2)
    with pytest.warns(FutureWarning, match="MoE: n_iter= is deprecated.*use dykstra_iters="):
        old = make(**soft, n_iter=2)
    assert old.dykstra_iters == 2
    assert torch.equal(routing_matrix(old, x), routing_matrix(new, x)) and torch.equal(old(x), new(x))
    assert (routing_matrix(new, x) - routing_matrix(make(**soft), x)).abs().max() > 1e-6
    with pytest.warns(FutureWarning, match=r"MoE.n_iter is deprecated.*use .dykstra_iters"):
        assert old.n_iter == 2
    with pytest.raises(ZooError, match="n_iter= is the deprecated name of dykstra_iters=; give dykstra_iters"):
        make(**soft, n_iter=2, dykstra_iters=2)


def test_bad_inputs_raise_one_clear_error() -> None:
    moe = make()
    with pytest.raises(ZooError, match="last dimension 5"):
        moe(seeded(2, 3, 5))
    with pytest.raises(ZooError, match="shape"):
        moe(seeded(2, 3, 4, DIM))
    with pytest.raises(ZooError, match="bool"):
        moe(seeded(2, 3, DIM), torch.zeros(2, 3))
    with pytest.raises(ZooError, match=r"expected \(2, 3\)"):
        moe(seeded(2, 3, DIM), torch.zeros(3, 2, dtype=torch.bool))


def test_routing_statistics_over_layers() -> None:
    """The logged summary over the layers (zoo.nn.moe.routing_statistics) from stats set by hand, and from a run."""
    a, b = MoE(DIM, HIDDEN, 4, router="token_choice"), MoE(DIM, HIDDEN, 2, router="expert_choice")
    assert routing_statistics([a, b]) == {} and routing_statistics([]) == {}  # nothing ran yet
    weight = torch.tensor(2.0, requires_grad=True)
    a.aux_loss, b.aux_loss = 0.6 * weight, torch.zeros(())
    a.stats = {
        "tokens_per_expert": torch.tensor([4, 0, 2, 2]),
        "dropped_fraction": torch.tensor(0.25),
        "router_entropy": torch.tensor(1.0),
    }
    b.stats = {
        "tokens_per_expert": torch.tensor([3, 3]),
        "dropped_fraction": torch.tensor(0.0),
        "router_entropy": torch.tensor(0.5),
    }
    stats = routing_statistics([a, b])
    # loads: a 4 / 2 = 2 (max over mean), 0 (min); b 1 and 1: means over the two layers 1.5 and 0.5
    expected = {
        "aux_loss": 1.2,
        "dropped_fraction": 0.125,
        "router_entropy": 0.75,
        "expert_load_max": 1.5,
        "expert_load_min": 0.5,
    }
    assert stats.keys() == expected.keys()
    for name, value in expected.items():
        assert stats[name].dim() == 0 and not stats[name].requires_grad, name
        torch.testing.assert_close(stats[name], torch.tensor(value), msg=name)
    x = seeded(2, 6, DIM)
    a(x), b(x)  # after a forward: the layers' own stats
    stats = routing_statistics([a, b])
    torch.testing.assert_close(stats["aux_loss"], a.aux_loss.detach() + b.aux_loss.detach())
    assert stats["expert_load_max"] >= 1.0 >= stats["expert_load_min"] >= 0.0


def test_a_layer_after_a_training_forward_deep_copies_and_averages() -> None:
    """The last forward's aux_loss carries the step's graph: the layer still deep-copies and pickles (EMA /
    AveragedModel, converters copy their source), the copy computes the same function, and the layer keeps the
    graph for the loss."""
    import copy
    import io

    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    layer = MoE(8, 16, 4, k=2)
    x = torch.randn(2, 5, 8)
    layer(x)
    assert layer.aux_loss.grad_fn is not None
    twin = copy.deepcopy(layer)
    assert twin.aux_loss.grad_fn is None and torch.equal(twin.aux_loss, layer.aux_loss.detach())
    torch.save(layer, io.BytesIO())
    averaged = AveragedModel(layer)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
        torch.testing.assert_close(averaged(x), layer(x), rtol=0, atol=0)
    layer(x)
    layer.aux_loss.backward()  # the layer's own graph is intact
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ export


def _stable_sorts(program: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if "sort.stable" in str(n.target)]


def test_token_choice_routing_exports_without_a_stable_sort() -> None:
    """The slots of token choice come from a sort of unique keys (expert, assignment number), not a stable sort,
    which ONNX cannot express (``torch.onnx.export`` failed on ``aten.sort.stable``); the exported program routes as
    eager, dropped assignments included (capacity 0.5: some are dropped)."""
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router="token_choice", k=2, capacity_factor=0.5).eval()
    x = torch.randn(2, 17, 8)
    exported = torch.export.export(layer, (x,))
    assert _stable_sorts(exported.run_decompositions()) == []
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), layer(x), rtol=0, atol=0)
        assert layer(x).shape == x.shape and float(layer.stats["dropped_fraction"]) > 0


@pytest.mark.parametrize(
    "options",
    [{"router": "token_choice"}, {"router": "token_choice", "k": 2}, {"router": "expert_choice", "group_size": 8}],
    ids=["token_choice", "token_choice_k2", "expert_choice_groups"],
)
def test_dynamic_batch_export_saves_and_routes_as_eager(options: dict, tmp_path) -> None:
    """torch.export with a dynamic batch: token choice's capacity C = ceil(1.25 k T / E) and expert choice's group
    count ceil(T / group_size) are functions of the batch size; no view between (E * C, dim) and (E, C, dim) and no
    negative floor division guard them (the export failed with a constraint violation), and C is an integer
    expression the exported program can serialise (torch.export.save failed on math.ceil). The loaded program gives
    eager's outputs at other batch sizes, capacity drops included."""
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, **options).eval()
    batch = torch.export.Dim("batch", min=2, max=32)  # token choice's C is 11 at 2 x 17 tokens
    exported = torch.export.export(layer, (torch.randn(4, 17, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(exported, tmp_path / "moe.pt2")
    loaded = torch.export.load(tmp_path / "moe.pt2").module()
    for b in (2, 3, 7):
        x = torch.randn(b, 17, 8)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)


def test_export_records_no_routing_statistics(recwarn: pytest.WarningsRecorder) -> None:
    """``aux_loss`` and ``stats`` are a training loop's record: under torch.export the layer leaves them as they were
    (torch.export warned that tensor attributes were assigned during export, for every V-MoE)."""
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router="token_choice").eval()
    x = torch.randn(2, 5, 8)
    layer(x)
    before = {"aux_loss": layer.aux_loss, **layer.stats}
    torch.export.export(layer, (x,))
    assert not [w for w in recwarn if "assigned during export" in str(w.message)]
    after = {"aux_loss": layer.aux_loss, **layer.stats}
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())  # the very tensors


def test_token_choice_capacity_in_integers_is_the_float_ceil() -> None:
    """Token choice's capacity is computed in integers for a dyadic capacity factor (so that an exported program
    with a dynamic batch can be saved and its shape bounds are known): the integer the float expression
    max(1, ceil(capacity_factor * k * T / E)) gives, for every factor, k, E and T tried."""
    from zoo.nn.moe import _capacity

    for cf in (0.5, 1.0, 1.25, 1.5, 2.0, 1.0625, 1.1, 0.3):
        for E in (1, 3, 4, 8, 32):
            for k in range(1, min(E, 3) + 1):
                for T in [*range(0, 400), 10**6 + 7, 12_345_678]:
                    assert _capacity(T, cf, k, E) == max(1, math.ceil(T * cf * k / E)), (cf, E, k, T)


def test_small_capacity_dynamic_batch_export() -> None:
    """A capacity of 2 at the smallest batch (2 x 5 tokens, 8 experts): the shape solver knows C > 1 over the whole
    batch range (C as an integer floor division; a view of the flat dispatch guarded C != 1, and a ceil of a symbolic
    float hides its bounds: the export failed with a constraint violation)."""
    torch.manual_seed(0)
    layer = MoE(8, 16, 8, router="token_choice").eval()
    batch = torch.export.Dim("batch", min=2, max=32)
    exported = torch.export.export(layer, (torch.randn(2, 5, 8),), dynamic_shapes=({0: batch},))
    for b in (2, 3, 9):
        x = torch.randn(b, 5, 8)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), layer(x), rtol=0, atol=0)
