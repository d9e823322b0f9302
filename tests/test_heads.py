"""FQL, FEdit, QAM-F, QAM-E (one-step and edit heads) and ReBRAC (METHODS.md §4.4, §5.8, §5.9, §5.11).

- hand-computed loss pieces (a point-mass behaviour field makes the ODE sample exact and
  noise-free, constant policies make the head's action known);
- closed forms on a Gaussian behaviour with a linear critic Q = wᵀa (flowrl/analytic.py): the
  trained one-step head is the ODE policy shifted by exactly D·w/(2α); the trained edit moves
  samples along +w by less than β;
- heads switched off (α = 0, β = 0; METHODS §4.5 quirk) are exactly their inner extractor —
  same samples, same initial parameters, same trained agent after several updates;
- ReBRAC's smoothed TD target, normalised actor loss, EMA target actor and 2-step target interval;
- every experiments/{fql,fedit,qam-fql,qam-edit,rebrac}/*.gin carries the METHODS §8.2 values.

Run with `-s` to see the measured closed-form numbers.
"""

from __future__ import annotations

import dataclasses
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extractors._behavior import BehaviorFlowPolicy
from extractors._head import HeadParams
from extractors.edit import EditModules, edit_objective
from extractors.fedit import FEdit
from extractors.fql import FQL
from extractors.one_step import one_step_example_loss
from extractors.qam import QAM
from extractors.qam_edit import QAMEdit
from extractors.qam_fql import QAMFQL
from extractors.rebrac import ReBRAC, ReBRACParams, rebrac_actor_objective
from flowrl.agent import AgentConfig, init_agent, update
from flowrl.analytic import GaussianMixture, LinearCritic, closed_form_context, fit_extractor
from flowrl.batch import Batch
from flowrl.cli import parse_gin
from flowrl.critic import chunked_td_target, pessimistic_value
from flowrl.errors import ConfigError
from flowrl.extractor import AbstractExtractor, Context, frozen_context_loss
from flowrl.policies import LogScalar, TanhGaussian
from flowrl.train import train
from tests.helpers import CHUNK_DIM, HIDDEN, HORIZON, OBS_DIM, tiny_batch, tiny_context

# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _report_cpu_time(request):
    """Print each test's CPU seconds (run with -s; the file's budget is about a CPU-minute)."""
    start = time.process_time()
    yield
    print(f"  [{request.node.name}: {time.process_time() - start:.1f} CPU-s]")


class PointMassField(eqx.Module):
    """v(s, x, t) = (m − x)/(1 − t): the exact flow of a point mass at m. Its K-step Euler sample
    is m for every z (the last step, 1 − t_{K−1} = h, lands on m), so ODE samples are noise-free."""

    target: jax.Array

    def __call__(self, obs, x, t):
        return (self.target - x) / (1.0 - t)


class ConstantPolicy(eqx.Module):
    """μ(s, z) = b for every s, z (stands in for the one-step network)."""

    bias: jax.Array

    def __call__(self, obs, noise):
        return self.bias


def point_mass_context(target, critic, target_critic, obs_dim: int = 2) -> Context:
    field = PointMassField(jnp.asarray(target))
    return Context(field, field, critic, target_critic, obs_dim, field.target.shape[0])


def _batch(observations, actions, valid=None, rewards=None, masks=None, next_observations=None) -> Batch:
    observations = jnp.asarray(observations, jnp.float32)
    n = observations.shape[0]
    return Batch(
        observations=observations,
        actions=jnp.asarray(actions, jnp.float32)[:, None, :],
        rewards=jnp.zeros(n) if rewards is None else jnp.asarray(rewards, jnp.float32),
        masks=jnp.ones(n) if masks is None else jnp.asarray(masks, jnp.float32),
        next_observations=observations if next_observations is None else jnp.asarray(next_observations),
        valid=jnp.ones(n) if valid is None else jnp.asarray(valid, jnp.float32),
    )


def _small(extractor):
    """Shrink `hidden_dims` of an extractor and of its inner one, as the contract test does."""
    changes = {"hidden_dims": HIDDEN}
    if hasattr(extractor, "inner") and hasattr(extractor.inner, "hidden_dims"):
        changes["inner"] = dataclasses.replace(extractor.inner, hidden_dims=HIDDEN)
    return dataclasses.replace(extractor, **changes)


@eqx.filter_jit
def _update(state, batch, extractor, config, key):
    """One agent update, compiled once per (extractor structure, config) across the tests."""
    return update(state, batch, extractor, config, key=key)


@eqx.filter_jit
def _samples(extractor, params, ctx, observations, keys):
    return jax.vmap(lambda o, k: extractor.sample(params, ctx, o, key=k))(observations, keys)


def _tree_allclose(a, b, **tolerances) -> None:
    a_leaves = jax.tree.leaves(eqx.filter(a, eqx.is_inexact_array))
    b_leaves = jax.tree.leaves(eqx.filter(b, eqx.is_inexact_array))
    assert len(a_leaves) == len(b_leaves) and a_leaves
    for x, y in zip(a_leaves, b_leaves):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerances)


# ------------------------------------------------------------------------------------------------
# One-step head (FQL, QAM-F): hand-computed loss
# ------------------------------------------------------------------------------------------------


def test_one_step_example_loss_is_alpha_mse_minus_q():
    mu = jnp.array([0.5, -0.2, 1.3])
    flow = jnp.array([0.1, 0.0, 0.9])
    loss, distill = one_step_example_loss(mu, flow, jnp.asarray(0.7), jnp.asarray(4.0))
    expected_distill = (0.4**2 + 0.2**2 + 0.4**2) / 3
    np.testing.assert_allclose(distill, expected_distill, rtol=1e-6)
    np.testing.assert_allclose(loss, 4.0 * expected_distill - 0.7, rtol=1e-6)
    # No gradient into the distillation target.
    grad_flow = jax.grad(lambda f: one_step_example_loss(mu, f, jnp.asarray(0.0), jnp.asarray(4.0))[0])(flow)
    np.testing.assert_array_equal(grad_flow, 0.0)


def test_fql_loss_on_a_point_mass_flow_is_hand_computed():
    """Base ODE sample = m exactly, μ ≡ b: L_F = α·mean_d(b − m)² − wᵀclip(b) with the ONLINE critic,
    and ∂L/∂b = (2α/D)(b − m) − w·1[|b| < 1] (the clip inside Q stops the Q gradient)."""
    m = jnp.array([0.3, -0.2, 0.5])
    b = jnp.array([0.6, -0.4, 1.3])  # third coordinate outside [−1, 1]
    w = jnp.array([1.0, 2.0, -1.5])
    ctx = point_mass_context(m, LinearCritic(w), LinearCritic(-10.0 * w))
    extractor = FQL(alpha=4.0, inner=BehaviorFlowPolicy(flow_steps=10))
    batch = _batch(np.zeros((5, 2)), np.zeros((5, 3)))

    def loss_of(bias):
        params = HeadParams(None, ConstantPolicy(bias))
        return frozen_context_loss(extractor, params, ctx, batch, key=jax.random.key(0))

    (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(b)
    distill = jnp.mean(jnp.square(b - m))
    q = w @ jnp.clip(b, -1.0, 1.0)
    np.testing.assert_allclose(metrics["distill_loss"], distill, rtol=1e-5)
    np.testing.assert_allclose(metrics["q_loss"], -q, rtol=1e-5)
    np.testing.assert_allclose(loss, 4.0 * distill - q, rtol=1e-5)
    np.testing.assert_allclose(metrics["inner/loss"], 0.0)
    expected_grad = (2.0 * 4.0 / 3.0) * (b - m) - w * (jnp.abs(b) < 1.0)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
    # Acting: clip(μ), whatever the key.
    params = HeadParams(None, ConstantPolicy(b))
    actions = _samples(extractor, params, ctx, jnp.zeros((2, 2)), jax.random.split(jax.random.key(1)))
    np.testing.assert_allclose(actions, jnp.tile(jnp.clip(b, -1.0, 1.0), (2, 1)))


# ------------------------------------------------------------------------------------------------
# Edit head (FEdit, QAM-E): hand-computed loss
# ------------------------------------------------------------------------------------------------


def test_edit_objective_values_and_gradients():
    q = jnp.array([1.0, 3.0])
    log_probs = jnp.array([-2.0, 0.5])
    alpha, target = jnp.asarray(0.5), jnp.asarray(-1.5)
    loss, metrics = edit_objective(q, log_probs, alpha, target)
    # −mean q + mean(α ℓ) + α (−mean ℓ − H): −2 + 0.5·(−0.75) + 0.5·(0.75 + 1.5)
    np.testing.assert_allclose(metrics["edit_q_loss"], -2.0)
    np.testing.assert_allclose(metrics["edit_entropy_loss"], -0.375)
    np.testing.assert_allclose(metrics["edit_alpha_loss"], 1.125)
    np.testing.assert_allclose(loss, -2.0 - 0.375 + 1.125, rtol=1e-6)
    grad_q, grad_logp, grad_alpha = jax.grad(lambda *a: edit_objective(*a, target)[0], argnums=(0, 1, 2))(
        q, log_probs, alpha
    )
    np.testing.assert_allclose(grad_q, [-0.5, -0.5])
    np.testing.assert_allclose(grad_logp, [0.25, 0.25])  # α/B only: the α-loss term is under sg
    np.testing.assert_allclose(grad_alpha, 0.75 + 1.5)  # entropy − H_tgt: α grows when entropy > target


def _deterministic_edit(obs_dim: int, action_dim: int, pre_tanh_mean) -> EditModules:
    """An edit policy with e = tanh(c) (zero weights, log-std bias −20 → σ ≈ 2e−9)."""
    policy = TanhGaussian(obs_dim + action_dim, action_dim, (8,), key=jax.random.key(0))
    policy = eqx.tree_at(
        lambda p: (p.mean_head.weight, p.mean_head.bias, p.log_std_head.weight, p.log_std_head.bias),
        policy,
        (
            jnp.zeros_like(policy.mean_head.weight),
            jnp.asarray(pre_tanh_mean, jnp.float32),
            jnp.zeros_like(policy.log_std_head.weight),
            jnp.full((action_dim,), -20.0),
        ),
    )
    return EditModules(policy, LogScalar(1.0))


def test_fedit_edit_is_beta_times_e_on_the_flow_sample_and_uses_the_online_critic():
    m = jnp.array([0.3, -0.2, 0.9])
    c = jnp.array([0.5, -1.0, 2.0])
    w = jnp.array([1.0, 2.0, -1.5])
    beta = 0.4
    ctx = point_mass_context(m, LinearCritic(w), LinearCritic(-10.0 * w))
    extractor = FEdit(edit_scale=beta)
    params = HeadParams(None, _deterministic_edit(2, 3, c))
    batch = _batch(np.zeros((4, 2)), np.zeros((4, 3)))
    _, metrics = eqx.filter_jit(frozen_context_loss)(extractor, params, ctx, batch, key=jax.random.key(0))
    edited = jnp.clip(m + beta * jnp.tanh(c), -1.0, 1.0)  # third coordinate clips at 1
    np.testing.assert_allclose(metrics["edit_q"], w @ edited, rtol=1e-5)
    np.testing.assert_allclose(metrics["edit_alpha"], 1.0)
    actions = _samples(extractor, params, ctx, jnp.zeros((2, 2)), jax.random.split(jax.random.key(3)))
    np.testing.assert_allclose(actions, jnp.tile(edited, (2, 1)), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Closed forms: Gaussian behaviour, linear critic
# ------------------------------------------------------------------------------------------------

# N(μ, Σ) small enough that ODE samples and the shifted/edited ones stay inside [−1, 1]
# (max |a| measured 0.68), so no clip is active and the closed forms apply.
GAUSSIAN = dict(weights=jnp.ones(1), means=jnp.array([[0.1, -0.1]]), covs=jnp.array([[[0.02, 0.005], [0.005, 0.015]]]))
W = jnp.array([1.0, -0.5])
NUM_EVAL = 4096


def _closed_form_context() -> Context:
    return closed_form_context(GaussianMixture(**GAUSSIAN), LinearCritic(W))


@pytest.mark.parametrize("alpha", [5.0, 20.0])
def test_trained_one_step_head_is_the_flow_shifted_by_d_w_over_2_alpha(alpha):
    """Per z, α/D·‖μ − a_ODE(z)‖² − wᵀμ is minimised by μ(z) = a_ODE(z) + D·w/(2α).

    Trained (2×64 MLP, the closed-form Adam loop of flowrl.analytic, 1000 steps, B = 256) and
    compared on 4096 keys with the base flow sampled from the SAME keys: the head draws z from a key
    exactly as its inner does (a head on a different z would leave an RMS residual ≈ the policy's
    spread, 0.14). Measured over
    seeds 0–2: |mean shift − D·w/(2α)| ≤ 4e−5, per-sample RMS residual ≤ 2.3e−3 (α = 5) and
    ≤ 1.3e−3 (α = 20). Tolerance 0.01 on the mean and 0.01 RMS: a dropped factor D (shift 0.1
    instead of 0.2 at α = 5), a missing factor 2, a sign flip or a head that ignores z all fail.
    """
    ctx = _closed_form_context()
    extractor = FQL(alpha=alpha, hidden_dims=(64, 64))
    params = fit_extractor(extractor, ctx, steps=1000, key=jax.random.key(0))
    keys = jax.random.split(jax.random.key(100), NUM_EVAL)
    obs = jnp.zeros((0,))
    head = jax.vmap(lambda k: extractor.sample(params, ctx, obs, key=k))(keys)
    base = jax.vmap(lambda k: extractor.inner.sample(None, ctx, obs, key=k))(jax.random.clone(keys))
    assert float(jnp.max(jnp.abs(head))) < 0.95 and float(jnp.max(jnp.abs(base))) < 0.95  # no clipping
    predicted = ctx.action_dim * W / (2.0 * alpha)
    shift = head - base
    print(f"\nFQL α={alpha}: mean shift {np.asarray(shift.mean(0))} vs {np.asarray(predicted)}, "
          f"RMS residual {np.asarray(jnp.sqrt(jnp.mean(jnp.square(shift - predicted[None, :]), 0)))}")
    residual = shift - predicted[None, :]
    np.testing.assert_allclose(shift.mean(0), predicted, atol=0.01)
    assert float(jnp.sqrt(jnp.mean(jnp.square(residual)))) < 0.01


def test_trained_edit_moves_samples_along_w_by_less_than_beta():
    """Edit head on the same problem: e ∈ (−1, 1)^D, so |â − a| < β; maximising wᵀ(a + βe) under
    the entropy target pushes each coordinate's mean edit to the sign of w_d.

    Measured over seeds 0–2 (β = 0.3, 1000 steps): mean edit (0.048…0.051, −0.028…−0.023),
    wᵀ·mean edit 0.060–0.064, max |edit| 0.2993. An untrained edit policy gives |wᵀ·mean edit| < 0.02
    (measured below), so the 0.03 margin separates a trained edit from a random one; a sign error
    in the Q term makes it negative.
    """
    beta = 0.3
    ctx = _closed_form_context()
    extractor = FEdit(edit_scale=beta, hidden_dims=(64, 64))
    obs = jnp.zeros((0,))
    base = jax.vmap(lambda k: extractor.inner.sample(None, ctx, obs, key=k))(
        jax.random.split(jax.random.key(100), NUM_EVAL)
    )
    edit_keys = jax.random.split(jax.random.key(7), NUM_EVAL)

    def mean_edit(params, keys):
        return jax.vmap(lambda a, k: extractor.edit(params.head, obs, a, key=k)[0] - a)(base, keys)

    untrained = mean_edit(extractor.init(ctx, key=jax.random.key(1)), jax.random.clone(edit_keys))
    params = fit_extractor(extractor, ctx, steps=1000, key=jax.random.key(0))
    edits = mean_edit(params, edit_keys)
    along_w = float(W @ edits.mean(0))
    print(f"\nFEdit β={beta}: mean edit {np.asarray(edits.mean(0))}, wᵀ mean {along_w:.4f}, "
          f"untrained {float(W @ untrained.mean(0)):.4f}, max |edit| {float(jnp.max(jnp.abs(edits))):.4f}")
    assert abs(float(W @ untrained.mean(0))) < 0.02
    assert along_w > 0.03
    assert bool(jnp.all(jnp.sign(edits.mean(0)) == jnp.sign(W)))
    assert float(jnp.max(jnp.abs(edits))) <= beta


# ------------------------------------------------------------------------------------------------
# α = 0 / β = 0: the head is exactly its inner (METHODS §4.5 quirk)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # 26 + 15 CPU-s: compiles QAM's update and each head's (QAM's is shared)
@pytest.mark.parametrize(
    "head", [QAMFQL(alpha=0.0), QAMEdit(edit_scale=0.0)], ids=["qam-fql-alpha0", "qam-edit-beta0"]
)
def test_switched_off_head_trains_exactly_as_plain_qam(head, getkey):
    """Same initial QAM parameters, same losses, TD targets and parameters after two agent updates
    on the same keys (only XLA's op ordering may differ: rtol 1e-5), head modules untouched, and
    the same actions for the same keys."""
    head = _small(head)
    qam = dataclasses.replace(QAM(), hidden_dims=HIDDEN)
    config = AgentConfig(horizon=HORIZON, batch_size=8, num_critics=3, actor_hidden_dims=HIDDEN,
                         critic_hidden_dims=HIDDEN, grad_clip_norm=1.0)
    init_key = getkey()
    head_state = init_agent(head, config, OBS_DIM, CHUNK_DIM, key=jax.random.clone(init_key))
    qam_state = init_agent(qam, config, OBS_DIM, CHUNK_DIM, key=init_key)
    _tree_allclose(head_state.online.extractor.inner, qam_state.online.extractor, rtol=0, atol=0)
    initial_head_modules = head_state.online.extractor.head

    for _ in range(2):
        batch, key = tiny_batch(getkey()), getkey()
        head_state, head_metrics = _update(head_state, batch, head, config, jax.random.clone(key))
        qam_state, qam_metrics = _update(qam_state, batch, qam, config, key)
        np.testing.assert_allclose(head_metrics["loss/total"], qam_metrics["loss/total"], rtol=1e-6)
        np.testing.assert_allclose(head_metrics["critic/target_mean"], qam_metrics["critic/target_mean"], rtol=1e-6)
    _tree_allclose(head_state.online.extractor.inner, qam_state.online.extractor, rtol=1e-5, atol=1e-6)
    _tree_allclose(head_state.online.critic, qam_state.online.critic, rtol=1e-5, atol=1e-6)
    _tree_allclose(head_state.target_behavior_flow, qam_state.target_behavior_flow, rtol=1e-5, atol=1e-6)
    _tree_allclose(head_state.online.extractor.head, initial_head_modules, rtol=0, atol=0)  # untouched

    # Acting: the same action for the same key.
    ctx = Context(head_state.online.behavior_flow, head_state.target_behavior_flow, head_state.online.critic,
                  head_state.target_critic, OBS_DIM, CHUNK_DIM)
    obs, keys = jax.random.normal(getkey(), (4, OBS_DIM)), jax.random.split(getkey(), 4)
    np.testing.assert_allclose(
        _samples(head, head_state.online.extractor, ctx, obs, jax.random.clone(keys)),
        _samples(qam, head_state.online.extractor.inner, ctx, obs, keys),
        rtol=1e-6,
    )


@pytest.mark.parametrize("head", [FQL(alpha=0.0), FEdit(edit_scale=0.0)], ids=["fql-alpha0", "fedit-beta0"])
def test_switched_off_head_over_the_behaviour_flow_is_the_bc_policy(head, getkey):
    head = _small(head)
    ctx = tiny_context(getkey())
    params = head.init(ctx, key=getkey())
    obs = jax.random.normal(getkey(), (4, OBS_DIM))
    keys = jax.random.split(getkey(), 4)
    np.testing.assert_array_equal(
        _samples(head, params, ctx, obs, jax.random.clone(keys)), _samples(BehaviorFlowPolicy(), None, ctx, obs, keys)
    )
    loss, metrics = eqx.filter_jit(frozen_context_loss)(head, params, ctx, tiny_batch(getkey()), key=getkey())
    assert float(loss) == 0.0 and float(metrics["head_loss"]) == 0.0


def test_heads_reject_bad_configuration():
    class NoNoiseMap(AbstractExtractor):
        def init(self, ctx, *, key):
            return None

        def loss(self, params, ctx, batch, *, key):
            return jnp.zeros(()), {"loss": jnp.zeros(())}

        def sample(self, params, ctx, obs, *, key):
            return jnp.zeros(ctx.action_dim)

    with pytest.raises(ConfigError, match="noise_to_action"):
        FQL(inner=NoNoiseMap())
    with pytest.raises(ConfigError, match="alpha must be >= 0"):
        QAMFQL(alpha=-1.0)
    with pytest.raises(ConfigError, match="edit_scale must be >= 0"):
        FEdit(edit_scale=-0.1)
    FEdit(inner=NoNoiseMap())  # the edit head needs only `sample`


# ------------------------------------------------------------------------------------------------
# ReBRAC
# ------------------------------------------------------------------------------------------------


def _rebrac_setup(getkey, **fields):
    extractor = dataclasses.replace(ReBRAC(**fields), hidden_dims=HIDDEN)
    ctx = tiny_context(getkey())
    actor_params = extractor.init(ctx, key=getkey())
    target = extractor.init(ctx, key=getkey()).actor  # a target actor different from the actor
    return extractor, ctx, ReBRACParams(actor_params.actor, target)


def test_rebrac_td_target_smooths_the_target_actor(getkey):
    extractor, ctx, params = _rebrac_setup(getkey, actor_noise=0.0)
    batch = tiny_batch(getkey())
    options = dict(discount=jnp.asarray(0.9), horizon=HORIZON, rho=jnp.asarray(0.5))
    y = extractor.td_target(params, ctx, batch, **options, key=getkey())
    next_actions = jax.vmap(params.target_actor)(batch.next_observations)  # σ = 0: the target mode
    next_q = jax.vmap(ctx.target_critic)(batch.next_observations, next_actions)
    expected = batch.rewards + 0.9**HORIZON * batch.masks * jax.vmap(lambda q: pessimistic_value(q, 0.5))(next_q)
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    np.testing.assert_allclose(y, jax.vmap(chunked_td_target, in_axes=(0, 0, 0, None, None, None))(
        batch.rewards, batch.masks, next_q, 0.9, HORIZON, 0.5), rtol=1e-6)

    # A huge σ clips every noise coordinate to ±c: with Q̄(s′, a) = Σ_d |a_d − μ̄_d(s′)| and ρ = 0
    # the backup reads off Σ_d |a′_d − μ̄_d(s′)| = D·c (|μ̄| < 1 − c here, so the outer clip is idle).
    assert float(jnp.max(jnp.abs(next_actions))) < 0.7
    extractor = dataclasses.replace(extractor, actor_noise=jnp.asarray(1e4), noise_clip=jnp.asarray(0.3))
    distance_critic = lambda o, a: jnp.sum(jnp.abs(a - params.target_actor(o)))[None]  # noqa: E731
    distance_ctx = dataclasses.replace(ctx, target_critic=distance_critic)
    options = dict(discount=jnp.asarray(0.9), horizon=HORIZON, rho=jnp.asarray(0.0))
    y = extractor.td_target(params, distance_ctx, batch, **options, key=getkey())
    np.testing.assert_allclose(y, batch.rewards + 0.9**HORIZON * batch.masks * CHUNK_DIM * 0.3, rtol=1e-5)


def test_rebrac_actor_loss_is_hand_computed_and_scale_invariant(getkey):
    q = jnp.array([2.0, -1.0, 3.0])
    actions = jnp.array([[0.1, 0.2], [0.0, -0.5], [0.3, 0.3]])
    data = jnp.array([[0.0, 0.0], [0.0, 0.0], [0.3, 0.5]])
    valid = jnp.array([1.0, 0.0, 1.0])
    loss, metrics = rebrac_actor_objective(q, actions, data, valid, jnp.asarray(0.5))
    scale = 1.0 / 2.0  # 1 / mean|q|
    np.testing.assert_allclose(metrics["q_loss"], -scale * 4.0 / 3.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["bc_loss"], 0.5 * (0.05 + 0.0 + 0.04) / 3.0, rtol=1e-6)
    np.testing.assert_allclose(loss, metrics["q_loss"] + metrics["bc_loss"], rtol=1e-6)
    # λ_n = sg(1/mean|q|): scaling the critic leaves the loss and its gradient unchanged.
    grad = jax.grad(lambda q: rebrac_actor_objective(q, actions, data, valid, jnp.asarray(0.5))[0])
    np.testing.assert_allclose(grad(q), -scale / 3.0 * jnp.ones(3), rtol=1e-6)  # not d(q/mean|q|)/dq
    np.testing.assert_allclose(grad(10.0 * q), -scale / 30.0 * jnp.ones(3), rtol=1e-6)

    # Through the extractor: the online critic at the actor's mode, pessimistic with the field ρ.
    extractor, ctx, params = _rebrac_setup(getkey, alpha_bc=0.3, rho=0.2)
    batch = tiny_batch(getkey())
    loss, metrics = frozen_context_loss(extractor, params, ctx, batch, key=getkey())
    mode = jax.vmap(params.actor)(batch.observations)
    q = jax.vmap(lambda o, a: pessimistic_value(ctx.critic(o, a), 0.2))(batch.observations, mode)
    expected, _ = rebrac_actor_objective(q, mode, batch.chunked_actions, batch.valid, jnp.asarray(0.3))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    scaled_ctx = dataclasses.replace(ctx, critic=lambda o, a: 7.0 * ctx.critic(o, a))
    scaled_loss, scaled_metrics = frozen_context_loss(extractor, params, scaled_ctx, batch, key=getkey())
    np.testing.assert_allclose(scaled_metrics["q_loss"], metrics["q_loss"], rtol=1e-5)


def test_rebrac_actor_init_and_sampling(getkey):
    extractor, ctx, params = _rebrac_setup(getkey, actor_noise=0.2, noise_clip=0.5)
    fresh = extractor.init(ctx, key=getkey())
    _tree_allclose(fresh.actor, fresh.target_actor, rtol=0, atol=0)
    weight = fresh.actor.mean_head.weight
    limit = np.sqrt(6.0 * 0.01 / sum(weight.shape))  # variance_scaling(0.01, fan_avg, uniform)
    assert float(jnp.max(jnp.abs(weight))) <= limit
    obs = jax.random.normal(getkey(), (OBS_DIM,))
    actions = jax.vmap(lambda k: extractor.sample(params, ctx, obs, key=k))(jax.random.split(getkey(), 256))
    mode = params.actor(obs)
    assert float(jnp.max(jnp.abs(actions - mode[None, :]))) <= 0.5 + 1e-6  # clipped exploration noise
    assert float(jnp.std(actions[:, 0])) > 0.1  # noisy, at evaluation too (quirk §9.4)
    quiet = dataclasses.replace(extractor, actor_noise=jnp.asarray(0.0))
    np.testing.assert_allclose(quiet.sample(params, ctx, obs, key=getkey()), mode, rtol=1e-6)


def test_rebrac_target_actor_is_emad_every_second_update(getkey):
    extractor = dataclasses.replace(ReBRAC(), hidden_dims=HIDDEN)
    config = AgentConfig(horizon=HORIZON, batch_size=8, num_critics=3, actor_hidden_dims=HIDDEN,
                         critic_hidden_dims=HIDDEN, target_update_interval=2, ema_rate=0.25)
    state = init_agent(extractor, config, OBS_DIM, CHUNK_DIM, key=getkey())
    step = eqx.filter_jit(lambda s, b, k: update(s, b, extractor, config, key=k))
    first, _ = step(state, tiny_batch(getkey()), getkey())
    # Update 1: actor trained, targets untouched.
    assert not np.array_equal(first.online.extractor.actor.mean_head.bias, state.online.extractor.actor.mean_head.bias)
    _tree_allclose(first.online.extractor.target_actor, state.online.extractor.target_actor, rtol=0, atol=0)
    _tree_allclose(first.target_critic, state.target_critic, rtol=0, atol=0)
    # Update 2: μ̄ ← τ·μ_before_update_2 + (1 − τ)·μ̄.
    second, _ = step(first, tiny_batch(getkey()), getkey())
    expected = jax.tree.map(
        lambda online, target: 0.25 * online + 0.75 * target,
        eqx.filter(first.online.extractor.actor, eqx.is_inexact_array),
        eqx.filter(first.online.extractor.target_actor, eqx.is_inexact_array),
    )
    _tree_allclose(second.online.extractor.target_actor, expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Paper configurations (METHODS.md §8.2)
# ------------------------------------------------------------------------------------------------

DOMAINS = (
    "antmaze-large-navigate", "antmaze-giant-navigate", "humanoidmaze-medium-navigate",
    "humanoidmaze-large-navigate", "cube-double-play", "cube-triple-play", "cube-quadruple-play",
    "scene-play", "puzzle-3x3-play", "puzzle-4x4-play",
)
_COLUMNS = dict(zip(DOMAINS, range(10)))
PAPER = {  # one row of METHODS §8.2 per tag, in DOMAINS order
    "fql": {"alpha": (3, 3, 30, 30, 300, 30, 100, 300, 300, 1)},
    "fedit": {"edit_scale": (0.2, 0.3, 0.5, 0.1, 0.2, 0.3, 0.4, 0.2, 0.2, 0.8)},
    "qam-fql": {"inv_temp": (3, 3, 1, 0.3, 1, 10, 0.3, 1, 3, 3), "alpha": (30, 30, 30, 30, 0, 300, 30, 300, 0, 3)},
    "qam-edit": {"inv_temp": (1, 10, 3, 3, 1, 3, 3, 1, 1, 0.1),
                 "edit_scale": (0.1, 0.1, 0.1, 0.1, 0, 0.1, 0.1, 0, 0.1, 0.9)},
    "rebrac": {"alpha_bc": (0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.03, 0.1, 0.01),
               "actor_noise": (0, 0, 0, 0.1, 0, 0.2, 0.2, 0, 0, 0.2)},
}


@pytest.mark.parametrize("name", sorted(PAPER))
@pytest.mark.parametrize("domain", DOMAINS)
def test_configs_carry_the_paper_settings(name, domain):
    parse_gin([f"{name}/{domain}.gin"], [])
    built = train(None, dry_run=True)
    extractor, agent = built["extractor"], built["agent"]
    column = _COLUMNS[domain]
    values = {
        "fql": lambda: {"alpha": extractor.alpha},
        "fedit": lambda: {"edit_scale": extractor.edit_scale},
        "qam-fql": lambda: {"inv_temp": extractor.inner.inv_temp, "alpha": extractor.alpha},
        "qam-edit": lambda: {"inv_temp": extractor.inner.inv_temp, "edit_scale": extractor.edit_scale},
        "rebrac": lambda: {"alpha_bc": extractor.alpha_bc, "actor_noise": extractor.actor_noise},
    }[name]()
    for field, row in PAPER[name].items():
        assert float(values[field]) == pytest.approx(row[column]), (name, domain, field)
    expected_type = {"fql": FQL, "fedit": FEdit, "qam-fql": QAMFQL, "qam-edit": QAMEdit, "rebrac": ReBRAC}[name]
    assert type(extractor) is expected_type
    if name.startswith("qam-"):
        assert type(extractor.inner) is QAM and extractor.inner.flow_steps == 10
        assert agent.grad_clip_norm == 1.0
    else:
        assert agent.grad_clip_norm is None
    if name == "rebrac":
        assert agent.target_update_interval == 2 and extractor.noise_clip == 0.5
        assert float(extractor.rho) == float(agent.rho)  # the actor's Q uses the domain's ρ
    else:
        assert agent.target_update_interval == 1
    assert built["env_name"].startswith(domain + "-singletask-task")
