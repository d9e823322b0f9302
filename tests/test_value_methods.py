"""FBRAC, FAWAC and IFQL (METHODS.md §5.2, §5.3, §5.7): hand-computed loss pieces, the paper configs,
and a closed-form check of FAWAC's weighted flow matching.

The generic contract (shapes, determinism, jit/vmap, gradients only into the extractor, end-to-end
training) is covered for every registered name by tests/test_extractor_contract.py and
tests/test_smoke_extractors.py; this file checks what is specific to these three methods.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from extractors._value import StateValue
from extractors.fawac import FAWAC, advantage_weight
from extractors.fbrac import FBRAC
from extractors.ifql import IFQL, expectile_loss, select_by_min_q
from flowrl.agent import AgentConfig, agent_loss, init_agent
from flowrl.analytic import (
    ClosedFormProblem,
    LinearCritic,
    closed_form_context,
    closed_form_metrics,
    make_problem,
    sample_batch_unclipped,
)
from flowrl.batch import Batch
from flowrl.cli import parse_gin
from flowrl.errors import ConfigError
from flowrl.extractor import Context, frozen_context_loss
from flowrl.flow import euler_ode_sample
from flowrl.networks import VelocityField
from flowrl.train import train
from tests.helpers import CHUNK_DIM, HIDDEN, HORIZON, OBS_DIM, tiny_batch, tiny_context

# ------------------------------------------------------------------------------------------------
# Small analytic pieces
# ------------------------------------------------------------------------------------------------


class MemberCritic(eqx.Module):
    """Q_e(s, a) = scale_e·Σ_d a_d + offset_e: an ensemble with known member values."""

    scale: jax.Array
    offset: jax.Array

    def __call__(self, obs, action):
        return self.scale * jnp.sum(action) + self.offset


class MinVersusMeanCritic(eqx.Module):
    """Q_1 = a_0, Q_2 = −a_0²: argmax of the min is a_0 ≈ 0, argmax of the mean is a_0 ≈ 0.5."""

    def __call__(self, obs, action):
        return jnp.stack([action[0], -jnp.square(action[0])])


class ContractingOffsetField(eqx.Module):
    """v(s, x, t_i) = D_i − c·x on the Euler grid: x_K depends on D_i through h·(1 − h·c)^{K−1−i}."""

    offsets: jax.Array  # (K, d)
    contraction: float = eqx.field(static=True)

    def __call__(self, obs, x, t):
        num_steps = self.offsets.shape[0]
        index = jnp.clip(jnp.round(t * num_steps).astype(jnp.int32), 0, num_steps - 1)
        return self.offsets[index] - self.contraction * x


def constant_value(obs_dim: int, value: float) -> StateValue:
    """A StateValue that outputs `value` for every observation (all weights 0, head bias = value)."""
    zeroed = jax.tree.map(jnp.zeros_like, StateValue(obs_dim, (4,), key=jax.random.key(0)))
    return eqx.tree_at(lambda v: v.mlp.layers[-1].bias, zeroed, jnp.array([value]))


def context_with(critic, target_critic, flow=None) -> Context:
    flow = VelocityField(OBS_DIM, CHUNK_DIM, HIDDEN, key=jax.random.key(7)) if flow is None else flow
    return Context(flow, flow, critic, target_critic, OBS_DIM, CHUNK_DIM)


# ------------------------------------------------------------------------------------------------
# Paper configurations (METHODS.md §8.2)
# ------------------------------------------------------------------------------------------------

DOMAINS = (
    "antmaze-large-navigate", "antmaze-giant-navigate", "humanoidmaze-medium-navigate",
    "humanoidmaze-large-navigate", "cube-double-play", "cube-triple-play", "cube-quadruple-play",
    "scene-play", "puzzle-3x3-play", "puzzle-4x4-play",
)
PAPER_VALUES = {  # METHODS.md §8.2, in DOMAINS order
    ("fbrac", "alpha"): (0.1, 0.1, 30, 10, 0.1, 0.03, 1, 100, 0.03, 0.3),
    ("fawac", "inv_temp"): (6.4, 0.8, 6.4, 0.8, 0.8, 0.8, 0.8, 6.4, 0.8, 0.8),
    ("ifql", "kappa"): (0.9, 0.8, 0.7, 0.8, 0.9, 0.95, 0.95, 0.9, 0.95, 0.9),
}
CLASSES = {"fbrac": FBRAC, "fawac": FAWAC, "ifql": IFQL}


@pytest.mark.parametrize("method,field", sorted(PAPER_VALUES))
@pytest.mark.parametrize("domain", DOMAINS)
def test_configs_carry_the_paper_settings(method, field, domain):
    parse_gin([f"{method}/{domain}.gin"], [])
    built = train(None, dry_run=True)
    extractor, agent = built["extractor"], built["agent"]
    assert isinstance(extractor, CLASSES[method])
    paper = PAPER_VALUES[(method, field)][DOMAINS.index(domain)]
    assert float(getattr(extractor, field)) == pytest.approx(paper)
    assert extractor.flow_steps == 10
    assert agent.grad_clip_norm is None  # plain Adam in the reference for all three
    if method == "ifql":
        # The value target's pessimism is the domain's ρ (0 in humanoidmaze).
        assert float(extractor.rho) == float(agent.rho) == (0.0 if "humanoid" in domain else 0.5)
        assert extractor.num_samples == 32
    if method == "fawac":
        assert float(extractor.weight_cap) == 100.0


def test_defaults_are_the_reference_get_config():
    assert float(FBRAC().alpha) == 100.0 and FBRAC().flow_steps == 10
    assert float(FAWAC().inv_temp) == 10.0 and float(FAWAC().weight_cap) == 100.0
    ifql = IFQL()
    assert float(ifql.kappa) == pytest.approx(0.9) and ifql.num_samples == 32 and ifql.flow_steps == 10


@pytest.mark.parametrize(
    "make",
    [lambda: FBRAC(alpha=0.0), lambda: FAWAC(weight_cap=-1.0), lambda: IFQL(kappa=1.0), lambda: IFQL(num_samples=0)],
)
def test_bad_hyperparameters_are_one_line_config_errors(make):
    with pytest.raises(ConfigError) as error:
        make()
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------
# FBRAC (§5.2)
# ------------------------------------------------------------------------------------------------


def test_fbrac_q_gradient_flows_through_every_euler_step():
    """With valid = 0 only the Q term is left: −(1/α)·mean_b Q(s, x_K), Q = wᵀa.

    For v(x, t_i) = D_i − c·x the Euler map gives ∂x_K/∂D_i = h·(1 − h·c)^{K−1−i}·I, so by hand
    ∂L/∂D_i = −(1/α)·h·(1 − h·c)^{K−1−i}·w for every step i (c = 5 keeps x_K inside the clip).
    A sampler under stop-gradient, or one that differentiated only the last step, would fail.
    """
    num_steps, alpha, contraction = 10, 4.0, 5.0
    h = 1.0 / num_steps
    w = jnp.array([1.0, -2.0, 0.5, 3.0])
    field = ContractingOffsetField(jnp.full((num_steps, CHUNK_DIM), 0.1), contraction)
    ctx = context_with(LinearCritic(w), LinearCritic(w), flow=field)
    batch = eqx.tree_at(lambda b: b.valid, tiny_batch(jax.random.key(1)), jnp.zeros((8,)))
    extractor = FBRAC(alpha=alpha, flow_steps=num_steps, hidden_dims=HIDDEN)

    def loss(offsets):
        params = ContractingOffsetField(offsets, contraction)
        return frozen_context_loss(extractor, params, ctx, batch, key=jax.random.key(2))[0]

    grads = jax.jit(jax.grad(loss))(field.offsets)
    decay = (1.0 - h * contraction) ** (num_steps - 1 - np.arange(num_steps))
    expected = -(1.0 / alpha) * h * decay[:, None] * np.asarray(w)[None, :]
    np.testing.assert_allclose(grads, expected, rtol=1e-4, atol=1e-7)


def test_fbrac_q_term_reaches_the_flow_network_and_loss_adds_up(getkey):
    ctx = tiny_context(getkey())
    extractor = FBRAC(alpha=0.5, hidden_dims=HIDDEN)
    params = extractor.init(ctx, key=getkey())
    invalid = eqx.tree_at(lambda b: b.valid, tiny_batch(getkey()), jnp.zeros((8,)))  # BC term off
    key = getkey()

    def loss(p):
        return frozen_context_loss(extractor, p, ctx, invalid, key=jax.random.clone(key))

    grads, metrics = eqx.filter_jit(jax.grad(loss, has_aux=True))(params)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    # Every layer of v_φ gets a gradient from the Q term alone.
    assert all(float(jnp.max(jnp.abs(g))) > 0.0 for g in leaves)
    assert float(metrics["bc_loss"]) == 0.0
    np.testing.assert_allclose(metrics["loss"], metrics["bc_loss"] + metrics["q_loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["q_loss"], -metrics["q"] / 0.5, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# FAWAC (§5.3)
# ------------------------------------------------------------------------------------------------


def test_fawac_weight_is_capped_at_100():
    advantage = jnp.array([-1.0, 0.0, 1.0, 3.0, 1e4])
    weights = advantage_weight(advantage, jnp.zeros(5), jnp.asarray(2.0), jnp.asarray(100.0))
    # exp(2·A): e^-2, 1, e^2 = 7.39, e^6 = 403 → 100, overflow to inf → 100 (no NaN).
    np.testing.assert_allclose(weights, [np.exp(-2.0), 1.0, np.exp(2.0), 100.0, 100.0], rtol=1e-6)
    assert float(jax.grad(lambda a: advantage_weight(a, 0.0, 2.0, 100.0))(5.0)) == 0.0  # flat above the cap


def test_fawac_loss_pieces_by_hand(getkey):
    """L_V against every *target* member, the weight from the *online* mean, both valid-weighted."""
    online = MemberCritic(jnp.array([1.0, 1.0]), jnp.array([0.0, 4.0]))  # mean Σa + 2
    target = MemberCritic(jnp.array([1.0, -1.0]), jnp.array([0.5, 0.0]))  # Σa + 0.5, −Σa
    ctx = context_with(online, target)
    extractor = FAWAC(inv_temp=0.5, hidden_dims=HIDDEN)
    value_const = 1.0
    params = eqx.tree_at(lambda p: p.value, extractor.init(ctx, key=getkey()), constant_value(OBS_DIM, value_const))
    batch = tiny_batch(getkey())
    _, metrics = frozen_context_loss(extractor, params, ctx, batch, key=getkey())

    sums = np.asarray(jnp.sum(batch.chunked_actions, axis=-1))
    valid = np.asarray(batch.valid)
    target_members = np.stack([sums + 0.5, -sums], axis=-1)
    expected_value_loss = np.mean(np.square(target_members - value_const) * valid[:, None])
    weights = np.minimum(np.exp(0.5 * (sums + 2.0 - value_const)), 100.0)
    np.testing.assert_allclose(metrics["value_loss"], expected_value_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["weight_mean"], weights.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["weight_max"], weights.max(), rtol=1e-5)
    np.testing.assert_allclose(metrics["v_mean"], value_const, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], metrics["value_loss"] + metrics["flow_loss"], rtol=1e-6)


def test_fawac_cap_binds_in_the_loss(getkey):
    """A huge advantage on one example gives weight exactly 100 there, and only there."""
    online = MemberCritic(jnp.array([1000.0, 1000.0]), jnp.zeros(2))
    ctx = context_with(online, online)
    extractor = FAWAC(inv_temp=1.0, hidden_dims=HIDDEN)
    params = eqx.tree_at(lambda p: p.value, extractor.init(ctx, key=getkey()), constant_value(OBS_DIM, 0.0))
    actions = jnp.zeros((8, HORIZON, CHUNK_DIM // HORIZON)).at[0].set(0.1)  # A = 400 on row 0, 0 elsewhere
    batch = eqx.tree_at(lambda b: b.actions, tiny_batch(getkey()), actions)
    _, metrics = frozen_context_loss(extractor, params, ctx, batch, key=getkey())
    assert float(metrics["weight_max"]) == 100.0
    np.testing.assert_allclose(metrics["weight_capped_frac"], 1 / 8)
    np.testing.assert_allclose(metrics["weight_mean"], (100.0 + 7 * 1.0) / 8, rtol=1e-6)


def test_fawac_weight_is_stop_gradient(getkey):
    """V receives gradient only from L_V: the weight exp(λ(Q − V)) is a constant of the flow loss."""
    ctx = tiny_context(getkey())
    extractor = FAWAC(inv_temp=3.0, hidden_dims=HIDDEN)
    params = extractor.init(ctx, key=getkey())
    batch = tiny_batch(getkey())
    key = getkey()
    # Only params are differentiated here (the contract test checks that no gradient reaches ctx).
    total = eqx.filter_jit(
        jax.grad(lambda v: extractor.loss(eqx.tree_at(lambda p: p.value, params, v), ctx, batch, key=key)[0])
    )(params.value)
    value_only = eqx.filter_jit(jax.grad(lambda v: extractor.value_loss(v, ctx, batch)))(params.value)
    assert bool(eqx.tree_equal(total, value_only, rtol=1e-6, atol=1e-8))


def test_fawac_and_fbrac_act_with_their_own_flow(getkey):
    """Swapping the context's behaviour flow does not change their actions (v_φ is in params)."""
    ctx = tiny_context(getkey())
    other = eqx.tree_at(lambda c: c.behavior_flow, ctx, VelocityField(OBS_DIM, CHUNK_DIM, HIDDEN, key=getkey()))
    obs = jax.random.normal(getkey(), (OBS_DIM,))
    for extractor in (FAWAC(hidden_dims=HIDDEN), FBRAC(hidden_dims=HIDDEN)):
        params = extractor.init(ctx, key=getkey())
        sample = eqx.filter_jit(lambda c, k: extractor.sample(params, c, obs, key=k))  # noqa: B023
        key = getkey()
        np.testing.assert_array_equal(sample(ctx, jax.random.clone(key)), sample(other, key))


# ---- FAWAC against the closed-form tilted target -------------------------------------------------
#
# Weighted flow matching with data a ~ π_β and weights ∝ exp(λ·Q) has the flow of π_β·exp(λQ) as its
# minimiser (the cap aside), i.e. the QAM target with τ = λ. Unlike QAM, the loss needs *samples*
# of π_β as data, so `fit_extractor` (zero-action batches) does not apply: `fit_fawac` draws a fresh
# batch of mixture samples each step. Setup as ANALYTIC-CHECK §6: 2x64 MLPs, Adam 1e-3 → 1e-5 cosine,
# global-norm clip 1, B = 256, 1000 steps, K = 10, n = 4096 unclipped Euler samples from fixed noise;
# obs_dim 1 (a constant 1: V's LayerNorm MLP needs a non-degenerate input). V is FAWAC's own, learned.
#
# Measured on 1d3 (mixture .3/.4/.3 at −1/0/1, Q = a, τ = 2; target mean 0.934), λ = τ:
#   seeds 0/1/2: W1 0.081/0.071/0.069, mean_err 0.019/0.012/0.010, τ_eff/τ 1.005/1.010/1.000;
#   seeds 3–9:   W1 0.066–0.086, mean_err 0.001–0.017, τ_eff/τ 1.01–1.08. V → 0.00 ± 0.01 (= E_β[a]).
# Must fail: λ = 0 (plain BC): W1 0.93–0.95, mean_err 0.93–0.95, τ_eff/τ ≤ 0.03 (seeds 0–2);
#   λ = 2τ (a factor-2 temperature bug; here the cap binds): W1 0.167–0.178, mean_err 0.149–0.168,
#   τ_eff/τ 2.29–2.66 (seeds 0, 3–9).
# Thresholds sit between the two groups: W1 ≤ 0.12 (pass max 0.086, λ = 2τ min 0.167; the Euler-10
# floor of the exact field is ~0.05), mean_err ≤ 0.06 (pass max 0.019, fail min 0.149), τ_eff/τ in
# [0.8, 1.25] (pass 1.00–1.08, fail ≤ 0.03 or ≥ 2.29).
FAWAC_W1_MAX = 0.12
FAWAC_MEAN_TOL = 0.06
FAWAC_TAU_BAND = (0.8, 1.25)
FIT_STEPS = 1000
NUM_EVAL = 4096


def _behaviour_batch(problem: ClosedFormProblem, key, batch_size: int) -> Batch:
    actions = problem.behaviour.sample(key, batch_size)
    return Batch(
        observations=jnp.ones((batch_size, 1)),
        actions=actions[:, None, :],
        rewards=jnp.zeros((batch_size,)),
        masks=jnp.ones((batch_size,)),
        next_observations=jnp.ones((batch_size, 1)),
        valid=jnp.ones((batch_size,)),
    )


@eqx.filter_jit
def _fit_fawac(extractor: FAWAC, problem: ClosedFormProblem, key, batch_size: int = 256):
    ctx = closed_form_context(problem.behaviour, problem.critic, obs_dim=1)
    init_key, train_key = jax.random.split(key)
    arrays, static = eqx.partition(extractor.init(ctx, key=init_key), eqx.is_inexact_array)
    optimiser = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(1e-3, FIT_STEPS, 1e-2))
    )

    def step(carry, step_key):
        arrays, opt_state = carry
        batch_key, loss_key = jax.random.split(step_key)
        batch = _behaviour_batch(problem, batch_key, batch_size)

        def loss(a):
            return frozen_context_loss(extractor, eqx.combine(a, static), ctx, batch, key=loss_key)[0]

        updates, opt_state = optimiser.update(jax.grad(loss)(arrays), opt_state, arrays)
        return (optax.apply_updates(arrays, updates), opt_state), None

    (arrays, _), _ = jax.lax.scan(step, (arrays, optimiser.init(arrays)), jax.random.split(train_key, FIT_STEPS))
    return eqx.combine(arrays, static)


def fawac_closed_form_metrics(inv_temp: float, seed: int) -> dict[str, float]:
    problem = make_problem("1d3")
    extractor = FAWAC(inv_temp=inv_temp, hidden_dims=(64, 64), flow_steps=10)
    params = _fit_fawac(extractor, problem, jax.random.key(seed))
    noise = jax.random.normal(jax.random.key(10_000 + seed), (NUM_EVAL, problem.behaviour.dim))
    samples = sample_batch_unclipped(params.flow, noise, 10, obs=jnp.ones((1,)))
    metrics = closed_form_metrics(samples, problem)
    print(f"\n[fawac 1d3 λ={inv_temp} seed={seed}] " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return metrics


def fawac_failures(metrics: dict[str, float]) -> list[str]:
    failures = []
    if not metrics["W1"] <= FAWAC_W1_MAX:
        failures.append(f"W1 {metrics['W1']:.3f} > {FAWAC_W1_MAX}")
    if not metrics["mean_err"] <= FAWAC_MEAN_TOL:
        failures.append(f"mean error {metrics['mean_err']:.3f} > {FAWAC_MEAN_TOL}")
    if not FAWAC_TAU_BAND[0] <= metrics["tau_ratio"] <= FAWAC_TAU_BAND[1]:
        failures.append(f"tau_eff/tau {metrics['tau_ratio']:.3f} outside {FAWAC_TAU_BAND}")
    return failures


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fawac_matches_the_tilted_mixture_when_inv_temp_equals_tau(seed):
    assert fawac_failures(fawac_closed_form_metrics(2.0, seed)) == []


@pytest.mark.parametrize("inv_temp", [0.0, 4.0])
def test_fawac_closed_form_check_rejects_wrong_temperatures(inv_temp):
    """λ = 0 is plain BC (the behaviour mixture); λ = 2τ over-tilts. Both must fail every criterion."""
    failures = fawac_failures(fawac_closed_form_metrics(inv_temp, 0))
    assert len(failures) == 3, failures


# ------------------------------------------------------------------------------------------------
# IFQL (§5.7)
# ------------------------------------------------------------------------------------------------


def test_expectile_loss_is_asymmetric():
    diff = jnp.array([2.0, -2.0, 0.0, 0.5])
    # κ = 0.9: 0.9·4 above V, 0.1·4 below, 0 at V, 0.9·0.25.
    np.testing.assert_allclose(expectile_loss(diff, jnp.asarray(0.9)), [3.6, 0.4, 0.0, 0.225], rtol=1e-6)
    # κ = 0.5 is half the squared error (the mean regression).
    np.testing.assert_allclose(expectile_loss(diff, jnp.asarray(0.5)), 0.5 * np.square(diff), rtol=1e-6)


def test_ifql_value_loss_by_hand(getkey):
    """q = mean_e Q̄_e − ρ·std_e Q̄_e at dataset actions (target critic), no valid mask."""
    target = MemberCritic(jnp.array([1.0, 1.0]), jnp.array([-1.0, 1.0]))  # mean Σa, std 1
    online = MemberCritic(jnp.array([5.0, 5.0]), jnp.array([9.0, 9.0]))  # must not be used
    ctx = context_with(online, target)
    extractor = IFQL(kappa=0.8, rho=0.5, hidden_dims=HIDDEN)
    batch = tiny_batch(getkey())
    loss, metrics = frozen_context_loss(extractor, constant_value(OBS_DIM, 0.2), ctx, batch, key=getkey())
    q = np.asarray(jnp.sum(batch.chunked_actions, axis=-1)) - 0.5 * 1.0
    diff = q - 0.2
    expected = np.mean(np.where(diff >= 0, 0.8, 0.2) * np.square(diff))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["above_v_frac"], np.mean(diff >= 0), rtol=1e-6)


def test_ifql_td_target_backs_up_the_value_net(getkey):
    """y = R + γ^H·M·V(s′): no action sample, no critic, no ρ."""
    ctx = tiny_context(getkey())
    batch = eqx.tree_at(
        lambda b: (b.rewards, b.masks), tiny_batch(getkey()), (jnp.arange(8.0) - 4.0, jnp.array([1.0, 0.0] * 4))
    )
    targets = IFQL(hidden_dims=HIDDEN).td_target(
        constant_value(OBS_DIM, 3.0), ctx, batch, discount=jnp.asarray(0.9), horizon=2, rho=jnp.asarray(0.5),
        key=getkey(),
    )
    expected = (np.arange(8.0) - 4.0) + 0.81 * np.array([1.0, 0.0] * 4) * 3.0
    np.testing.assert_allclose(targets, expected, rtol=1e-6)


def test_ifql_trainer_uses_the_value_backup(getkey):
    """Through the trainer: the logged mean critic target is mean_b(R + γ^H·M·V(s′)) with the online V."""
    config = AgentConfig(
        horizon=HORIZON, batch_size=8, num_critics=3, actor_hidden_dims=HIDDEN, critic_hidden_dims=HIDDEN
    )
    extractor = IFQL(hidden_dims=HIDDEN)
    state = init_agent(extractor, config, OBS_DIM, CHUNK_DIM, key=getkey())
    batch = tiny_batch(getkey())
    _, metrics = agent_loss(state.online, state, batch, extractor, config, key=getkey())
    next_v = jax.vmap(state.online.extractor)(batch.next_observations)
    expected = jnp.mean(batch.rewards + 0.99**HORIZON * batch.masks * next_v)
    np.testing.assert_allclose(metrics["critic/target_mean"], expected, rtol=1e-5)


def test_select_by_min_q_by_hand():
    candidates = jnp.array([[0.0], [0.5], [1.0]])
    q_values = jnp.array([[0.0, 0.0], [0.5, -0.25], [1.0, -1.0]])  # min 0, −.25, −1; mean 0, .125, 0
    np.testing.assert_array_equal(select_by_min_q(candidates, q_values), [0.0])
    assert int(jnp.argmax(jnp.mean(q_values, axis=-1))) == 1  # the mean would have chosen 0.5


def test_ifql_acts_by_argmax_of_the_ensemble_min(getkey):
    """sample = the candidate with the largest min_e Q_e (online critic), not the largest mean."""
    ctx = context_with(MinVersusMeanCritic(), MemberCritic(jnp.zeros(2), jnp.zeros(2)))
    extractor = IFQL(hidden_dims=HIDDEN)
    obs = jax.random.normal(getkey(), (OBS_DIM,))
    key = getkey()
    candidate_key, noise_key = jax.random.clone(key), jax.random.clone(key)
    candidates = eqx.filter_jit(extractor.candidate_actions)(ctx, obs, key=candidate_key)
    action = eqx.filter_jit(extractor.sample)(None, ctx, obs, key=key)
    assert candidates.shape == (32, CHUNK_DIM)
    q_values = jax.vmap(lambda a: MinVersusMeanCritic()(obs, a))(candidates)
    by_min = candidates[int(jnp.argmax(jnp.min(q_values, axis=-1)))]
    by_mean = candidates[int(jnp.argmax(jnp.mean(q_values, axis=-1)))]
    np.testing.assert_array_equal(action, by_min)
    assert not np.array_equal(by_min, by_mean)  # the critic separates the two rules for this key
    # Candidates are clipped Euler samples of the *online* behaviour flow.
    z = jax.random.normal(noise_key, (32, CHUNK_DIM))
    expected = eqx.filter_jit(euler_ode_sample)(ctx.behavior_flow, obs, z[3], 10)
    np.testing.assert_allclose(candidates[3], expected, rtol=1e-5, atol=1e-6)


def test_ifql_acts_on_a_batch_of_observations(getkey):
    """Quirk 9.7 (single observation only in the reference) is gone: vmapped acting = per-row acting."""
    ctx = tiny_context(getkey())
    extractor = IFQL(hidden_dims=HIDDEN, num_samples=8)
    observations = jax.random.normal(getkey(), (5, OBS_DIM))
    keys = jax.random.split(getkey(), 5)
    sample = eqx.filter_jit(lambda o, k: extractor.sample(None, ctx, o, key=k))
    batched = eqx.filter_jit(jax.vmap(sample))(observations, jax.random.clone(keys))
    assert batched.shape == (5, CHUNK_DIM)
    for i in range(5):
        np.testing.assert_allclose(batched[i], sample(observations[i], keys[i]), rtol=1e-5, atol=1e-6)
