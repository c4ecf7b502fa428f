"""Switch policies: decisions against the rules of docs/algorithms.md section 5, evaluated independently in float64."""


import pytest
import torch

from lotus_dist.optim import LowRankAdamW
from lotus_dist.optim import basis_solvers as bs
from lotus_dist.optim import subspace as ss
from lotus_dist.optim.switching import POLICIES, exact_path_efficiency


def _noise_level(t):
    # phases of calm and of turbulence so that switches happen at different tau, not only at the first check
    return [0.05, 0.6, 1.5, 0.3][(t // 23) % 4]


@pytest.mark.parametrize("shape", [(20, 40), (40, 20)])
def test_displacement_switches_exactly_per_algorithm_1(shape):
    gamma, eta, steps = 0.05, 5, 150
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen)
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = LowRankAdamW(
        [{"params": [w], "rank": 4, "solver": "svd", "switch": "displacement", "gamma": gamma, "verify_gap": eta}]
    )
    side = ss.side_for(shape, "std")
    st = None
    P = d_init = None
    tau = 0
    expected, actual, taus = [], [], []
    for t in range(steps):
        G = base + _noise_level(t) * torch.randn(shape, generator=gen)
        w.grad = G
        # Reference Algorithm 1 on R in the basis in use before this step.
        if P is None:
            switch = True  # first basis
        else:
            tau += 1
            R = ss.project(G, P, side).double()
            d_cur = R / R.norm()
            switch = tau % eta == 0 and float((d_cur - d_init).norm()) / tau < gamma
            if switch:
                taus.append(tau)
        before = st["n_bases"] if st else 0
        opt.step()
        st = opt.state[w]
        actual.append(st["n_bases"] > before)
        expected.append(switch)
        if st["n_bases"] > before:
            P = st["projector"].clone()
            R_new = ss.project(G, P, side).double()
            d_init, tau = R_new / R_new.norm(), 1
    assert actual == expected
    assert sum(expected) >= 5 and len(set(taus)) >= 3, taus  # several switches at several different tau


def test_displacement_bounded_interval():
    """‖d_cur − d_init‖ ≤ 2, so a switch comes by τ ≈ 2/γ even for adversarial gradients."""
    gamma, eta = 0.1, 5
    w = torch.nn.Parameter(torch.zeros(10, 30))
    opt = LowRankAdamW([{"params": [w], "rank": 3, "solver": "svd", "gamma": gamma, "verify_gap": eta}])
    gen = torch.Generator().manual_seed(1)
    for _ in range(41):
        w.grad = torch.randn(10, 30, generator=gen)
        opt.step()
    assert opt.state[w]["n_bases"] >= 2


def test_fixed_switches_every_T():
    T = 7
    w = torch.nn.Parameter(torch.zeros(12, 30))
    opt = LowRankAdamW([{"params": [w], "rank": 3, "solver": "random", "switch": "fixed", "update_gap": T}])
    gen = torch.Generator().manual_seed(2)
    switched_at = []
    for t in range(1, 51):  # 1-based optimizer step
        w.grad = torch.randn(12, 30, generator=gen)
        before = opt.state[w].get("n_bases", 0)
        opt.step()
        if opt.state[w]["n_bases"] > before:
            switched_at.append(t)
    assert switched_at == [1, 8, 15, 22, 29, 36, 43, 50]


def test_every_step_policy():
    w = torch.nn.Parameter(torch.zeros(12, 30))
    opt = LowRankAdamW([{"params": [w], "rank": 3, "solver": "rsvd", "switch": "every_step"}])
    for _ in range(6):
        w.grad = torch.randn(12, 30)
        opt.step()
    assert opt.state[w]["n_bases"] == 6


def _pe_estimate(grads, P, side, seed, window):
    policy = POLICIES["path_efficiency"]
    shape = tuple(grads[0].shape)
    r = P.shape[1] if side == "left" else P.shape[0]
    state = {"index": 0, "n_bases": 1, "step": 0}
    policy.allocate(state, shape, side, r, torch.float32, "cpu")
    group = {"seed": seed, "window": window}
    for G in grads:
        policy.observe(state, group, ss.project(G, P, side), G, P, side, torch.Generator())
    return policy.rho(policy.statistics(state, group, ss.project(grads[-1], P, side)).tolist())


@pytest.mark.parametrize("shape", [(64, 160), (160, 64)])
def test_path_efficiency_estimator_error(shape):
    """ρ_est vs exact ρ over 40 sketch seeds: unbiased-ish, mean |error| < 0.03, max < 0.1; exact in-subspace."""
    side = ss.side_for(shape, "std")
    d = ss.projected_dim(shape, side)
    gen = torch.Generator().manual_seed(3)
    S = bs.random_columns(d, 8, gen, "cpu")
    P = ss.to_projector(S, side)
    drift = torch.randn(shape, generator=gen)
    inside = ss.project_back(ss.project(drift, P, side), P, side)
    grads = [inside + 0.4 * drift + 0.8 * torch.randn(shape, generator=gen) for _ in range(10)]
    exact = exact_path_efficiency(grads, P, side)
    assert 0.2 < exact < 0.9
    errors = [abs(_pe_estimate(grads, P, side, seed, 10) - exact) for seed in range(40)]
    assert sum(errors) / len(errors) < 0.03, errors
    assert max(errors) < 0.1, errors
    # gradients inside the subspace: ρ = 1 with no sketch error
    in_grads = [ss.project_back(ss.project(g, P, side), P, side) for g in grads]
    assert abs(_pe_estimate(in_grads, P, side, 0, 10) - 1.0) < 1e-3


def test_path_efficiency_switch_rule():
    """Switch when ρ < γ_ρ at a window end and t − t_last ≥ T_min; otherwise the window restarts."""
    w = torch.nn.Parameter(torch.zeros(16, 40))
    group = {"params": [w], "rank": 2, "solver": "random", "switch": "path_efficiency", "window": 4, "t_min": 10}
    opt = LowRankAdamW([{**group, "gamma": 0.99}])
    gen = torch.Generator().manual_seed(4)
    switched_at = []
    for t in range(1, 31):
        w.grad = torch.randn(16, 40, generator=gen)  # isotropic noise: ρ ≈ sqrt(r/d) far below 0.99
        before = opt.state[w].get("n_bases", 0)
        opt.step()
        if opt.state[w]["n_bases"] > before:
            switched_at.append(t)
    # windows close before steps 5, 9, 13, ... (4 steps each); T_min=10 allows only the third after a switch
    assert switched_at == [1, 13, 25]
    assert opt.state[w]["pe_rho"] < 0.99
    # with γ_ρ tiny it never switches
    w2 = torch.nn.Parameter(torch.zeros(16, 40))
    opt2 = LowRankAdamW([{**group, "params": [w2], "gamma": 1e-6}])
    for _ in range(30):
        w2.grad = torch.randn(16, 40, generator=gen)
        opt2.step()
    assert opt2.state[w2]["n_bases"] == 1


def _recorded_gradients(steps: int = 60) -> dict[str, list[torch.Tensor]]:
    """The projected matrices' gradients of a small LLaMA trained with AdamW on a fixed random Markov chain: a real
    gradient sequence (its direction drifts as the model learns), recorded once per step."""
    from lotus_dist.model.llama import Llama, llama_config

    torch.manual_seed(0)
    vocab = 64
    model = Llama(llama_config("tiny", vocab_size=vocab, dim=32, n_layers=2, n_heads=2, ffn_dim=48))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    chain = torch.softmax(torch.randn(vocab, vocab) * 3, dim=-1)
    gen = torch.Generator().manual_seed(1)
    recorded = {n: [] for n, p in model.named_parameters() if p.dim() == 2 and n.split(".")[-2].endswith("_proj")}
    for _ in range(steps):
        tokens = [torch.randint(0, vocab, (8,), generator=gen)]
        for _ in range(32):
            tokens.append(torch.multinomial(chain[tokens[-1]], 1, generator=gen).squeeze(1))
        batch = torch.stack(tokens, dim=1)
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            if n in recorded:
                recorded[n].append(p.grad.detach().clone())
        opt.step()
    return recorded


def test_a_bf16_switch_reference_makes_the_same_decisions_as_fp32():
    """optim.reference_dtype=bf16 (the default) stores d_init in bf16: on recorded gradient sequences every check
    decides as with the exact fp32 reference, for thresholds that make both switches and stays happen."""
    recorded = _recorded_gradients()
    switches = stays = 0
    for gamma in (0.02, 0.05, 0.1):
        for name, grads in recorded.items():
            bases = {}
            for ref in ("bf16", "fp32"):
                w = torch.nn.Parameter(torch.zeros_like(grads[0]))
                opt = LowRankAdamW([{"params": [w], "rank": 4, "switch": "displacement", "gamma": gamma,
                                     "verify_gap": 4, "reference_dtype": ref}])
                seq = []
                for g in grads:
                    w.grad = g.clone()
                    opt.step()
                    seq.append(opt.state[w]["n_bases"])
                assert opt.state[w]["d_init"].dtype == (torch.bfloat16 if ref == "bf16" else torch.float32)
                bases[ref] = seq
            assert bases["bf16"] == bases["fp32"], (name, gamma)
            checks = len(grads) // 4
            switches += bases["fp32"][-1] - 1
            stays += checks - (bases["fp32"][-1] - 1)
    assert switches > 20 and stays > 20, (switches, stays)  # both kinds of decision were made, many times


def test_lotus_state_at_llama_60m_is_within_4_percent_of_galores_formula():
    from lotus_dist.model.llama import Llama, llama_config
    from lotus_dist.optim import build_optimizer, memory_report
    from lotus_dist.train.config import OptimConfig

    with torch.device("meta"):
        model = Llama(llama_config("llama_60m"))
    formula = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and name.split(".")[-2].endswith("_proj"):
            long, short = max(p.shape), min(p.shape)
            formula += (2 * long * 128 + short * 128) * 4  # GaLore: two moments (long x r) + projector (short x r)
        else:
            formula += 2 * p.numel() * 4
    opt = build_optimizer(model, OptimConfig(name="lotus", rank=128))
    opt.init_state()
    lotus = memory_report(opt)["total"]
    assert lotus <= 1.04 * formula, lotus / formula
    exact = build_optimizer(model, OptimConfig(name="lotus", rank=128, reference_dtype="fp32"))
    exact.init_state()
    assert memory_report(exact)["total"] > 1.07 * formula  # what the fp32 reference costs


@pytest.mark.parametrize("update_gap", [50, 200])
def test_displacement_gamma_defaults_to_two_over_the_update_gap(update_gap):
    """γ unset: 2 / optim.update_gap (Lotus's clock tied to GaLore's). The distance of two unit directions is at most
    2 (antipodal), so even a gradient that turned around switches exactly once τ > T: never later than GaLore's T."""
    policy = POLICIES["displacement"]
    group = {"gamma": None, "update_gap": update_gap}
    assert policy.gamma(group) == 2.0 / update_gap
    antipodal = [1.0, -1.0, 1.0]  # [‖R‖², ⟨R, D⟩, ‖D‖²] of R = -D: distance 2
    switched = [tau for tau in range(1, 3 * update_gap) if policy.decide({"tau": tau}, group, antipodal)]
    assert switched[0] == update_gap + 1 and switched == list(range(update_gap + 1, 3 * update_gap))
    explicit = {"gamma": 0.5, "update_gap": update_gap}  # an explicit γ is used as given: 2 / τ < 0.5 from τ = 5
    assert policy.gamma(explicit) == 0.5 and policy.decide({"tau": 5}, explicit, antipodal)
    assert not policy.decide({"tau": 4}, explicit, antipodal)
