"""layers/moe.py's grouped expert computation vs a dense reference: every expert on every
token, masked by the routing."""

import pytest
import torch
import torch.nn.functional as F

from aphrodite.executor.layers.moe import SparseMoe, route, run_experts

torch.set_num_threads(1)

E, HIDDEN, INTER = 6, 32, 24


def dense_reference(x, router, gate_up, down, top_k, renormalize):
    probs = torch.softmax(F.linear(x, router).float(), dim=-1)
    top = torch.topk(probs, top_k, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True) if renormalize else top.values
    mask = torch.zeros_like(probs).scatter(1, top.indices, weights)   # [tokens, E]
    out = torch.zeros_like(x)
    for e in range(E):
        gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
        out += mask[:, e:e + 1] * F.linear(F.silu(gate) * up, down[e])
    return out


def random_experts(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, HIDDEN, generator=g),
            torch.randn(E, 2 * INTER, HIDDEN, generator=g) * 0.2,
            torch.randn(E, HIDDEN, INTER, generator=g) * 0.2)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens,top_k", [(1, 2), (7, 2), (40, 3)])
def test_grouped_experts_match_dense(tokens, top_k, renormalize):
    router, gate_up, down = random_experts(tokens)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1))
    weights, experts = route(F.linear(x, router), top_k, renormalize)
    out = run_experts(x, gate_up, down, weights, experts)
    torch.testing.assert_close(out, dense_reference(x, router, gate_up, down, top_k, renormalize),
                               atol=1e-5, rtol=1e-5)


def test_uneven_routing_with_idle_experts():
    router, gate_up, down = random_experts(3)
    # A router that sends almost every token to experts 4 and 1, a few to 2, none to 0, 3, 5.
    router = torch.zeros(E, HIDDEN)
    router[4, 0], router[1, 1], router[2, 2] = 8.0, 4.0, 1.0
    x = torch.randn(30, HIDDEN, generator=torch.Generator().manual_seed(2)).abs()
    x[:3, 2] = 40.0        # these three pick expert 2 first
    weights, experts = route(F.linear(x, router), 2, True)
    counts = torch.bincount(experts.reshape(-1), minlength=E).tolist()
    assert counts[0] == counts[3] == counts[5] == 0 and counts[2] >= 3 and counts[4] >= 20
    out = run_experts(x, gate_up, down, weights, experts)
    torch.testing.assert_close(out, dense_reference(x, router, gate_up, down, 2, True),
                               atol=1e-5, rtol=1e-5)


def test_module_loads_experts_and_matches_dense():
    router, gate_up, down = random_experts(4)
    moe = SparseMoe(HIDDEN, INTER, E, 2, False, torch.float32)
    moe.gate.load("weight", router, "router")
    slots = set()
    for e in range(E):
        gate, up = gate_up[e].chunk(2, dim=0)
        slots |= {moe.load_expert(e, "gate", gate), moe.load_expert(e, "up", up),
                  moe.load_expert(e, "down", down[e])}
    assert len(slots) == 3 * E
    moe.gate.finish_loading()
    x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense_reference(x, router, gate_up, down, 2, False),
                                   atol=1e-5, rtol=1e-5)


def test_tensor_parallel_shards_sum_to_the_whole():
    router, gate_up, down = random_experts(6)
    x = torch.randn(11, HIDDEN, generator=torch.Generator().manual_seed(7))
    total = torch.zeros(11, HIDDEN)
    for rank in range(2):   # each rank's partial output; the all-reduce is their sum
        moe = SparseMoe(HIDDEN, INTER, E, 2, True, torch.float32, rank, 2, all_reduce=lambda t: t)
        moe.gate.load("weight", router, "router")
        for e in range(E):
            gate, up = gate_up[e].chunk(2, dim=0)
            moe.load_expert(e, "gate", gate), moe.load_expert(e, "up", up)
            moe.load_expert(e, "down", down[e])
        assert moe.experts.gate_up_proj.weight.shape == (E, INTER, HIDDEN)
        with torch.no_grad():
            total += moe(x)
    torch.testing.assert_close(total, dense_reference(x, router, gate_up, down, 2, True),
                               atol=1e-5, rtol=1e-5)
