r"""The edit head: a stochastic, bounded edit β·e of an inner policy's action, trained to raise Q.

EXPO-style editing (Dong et al., "EXPO: Stable Reinforcement Learning with Expressive Policies",
2025) as FEdit and QAM-E use it (METHODS.md §4.4 QAM-E extra, §5.8; reference `agents/fedit.py`,
`agents/qam.py` edit branch). With a = inner.sample(s) (clipped, no gradient) and an edit policy
π_e(·|s, a) = tanh-Gaussian on concat(s, a):

    e ~ π_e(·|s, a) (reparameterised),  ℓ = log π_e(e|s, a),  â = clip(a + β·e, −1, 1),
    L_E = −mean_b mean_e Q_e(s, â) + mean_b(sg α·ℓ) + α·(sg(−mean_b ℓ) − H_tgt),

H_tgt = −m·D with m = `target_entropy_multiplier` (0.5), α = exp(log α) initialised at 1; the
online critic (ensemble mean, no pessimism), no `valid` mask. Acting and TD targets use the same
sampler: a fresh a from the inner, then â. Since e ∈ (−1, 1)^D, the edit moves each action
coordinate by less than β, in the direction that raises Q (tests/test_heads.py: on a linear critic
Q = wᵀa the mean edit has the sign of w, coordinate by coordinate, and stays below β).

β = 0 turns the head off: the extractor is then exactly its inner (METHODS §4.5 quirk: QAM-E with
β = 0 is plain QAM), see `extractors/_head.py`.

The registered strategies are `extractors/fedit.py` (inner: the behaviour flow) and
`extractors/qam_edit.py` (inner: QAM); `AbstractEditHead` holds their shared maths.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from extractors._head import AbstractHead, HeadParams, is_concrete
from flowrl.batch import Batch
from flowrl.errors import ConfigError
from flowrl.extractor import AbstractExtractor, Context, Metrics
from flowrl.policies import LogScalar, TanhGaussian, temperature_loss


class EditModules(eqx.Module):
    """The edit head's trainable parts: π_e(·|s, a) and its entropy temperature α."""

    policy: TanhGaussian
    log_alpha: LogScalar


def edit_objective(
    q_values: Float[Array, " b"],
    log_probs: Float[Array, " b"],
    alpha: Float[Array, ""],
    target_entropy: Float[Array, ""],
) -> tuple[Float[Array, ""], Metrics]:
    """L_E = −mean q + mean(sg α·ℓ) + α·(sg(−mean ℓ) − H_tgt), with its three parts as metrics.

    Pure in its inputs: q_b = mean_e Q_e(s_b, â_b), ℓ_b = log π_e(e_b|s_b, a_b). α's gradient comes
    only from the last term (SAC temperature loss), ℓ's only from the second.
    """
    q_loss = -jnp.mean(q_values)
    entropy_loss = jnp.mean(jax.lax.stop_gradient(alpha) * log_probs)
    alpha_loss = temperature_loss(alpha, log_probs, target_entropy)
    return q_loss + entropy_loss + alpha_loss, {
        "edit_q_loss": q_loss,
        "edit_entropy_loss": entropy_loss,
        "edit_alpha_loss": alpha_loss,
    }


class AbstractEditHead(AbstractHead):
    """Edit head over `inner`. Concrete subclasses set the fields and their defaults."""

    inner: eqx.AbstractVar[AbstractExtractor]
    edit_scale: eqx.AbstractVar[Float[Array, ""]]  # β; 0 = head off
    target_entropy_multiplier: eqx.AbstractVar[Float[Array, ""]]  # m in H_tgt = −m·D
    hidden_dims: eqx.AbstractVar[tuple[int, ...]]  # π_e trunk

    def __check_init__(self):
        if is_concrete(self.edit_scale) and not bool(self.edit_scale >= 0):
            raise ConfigError(
                f"{type(self).__name__}.edit_scale must be >= 0 (0 turns the edit head off), "
                f"got {float(self.edit_scale)}"
            )

    def enabled(self) -> Bool[Array, ""]:
        return self.edit_scale > 0

    def init_head(self, ctx: Context, *, key: PRNGKeyArray) -> EditModules:
        policy = TanhGaussian(ctx.obs_dim + ctx.action_dim, ctx.action_dim, self.hidden_dims, key=key)
        return EditModules(policy, LogScalar(1.0))

    def edit(
        self, modules: EditModules, obs: Float[Array, " obs"], action: Float[Array, " d"], *, key: PRNGKeyArray
    ) -> tuple[Float[Array, " d"], Float[Array, ""]]:
        """(â = clip(a + β·e, −1, 1), log π_e(e|s, a)) with e ~ π_e(·|s, a) reparameterised."""
        edit, log_prob = modules.policy.sample_and_log_prob(jnp.concatenate([obs, action]), key=key)
        return jnp.clip(action + self.edit_scale * edit, -1.0, 1.0), log_prob

    def head_loss(
        self, params: HeadParams, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        inner_params = jax.lax.stop_gradient(params.inner)  # the edit is trained; the inner is not, here

        def example(obs, key):
            base_key, edit_key = jax.random.split(key)
            action = jax.lax.stop_gradient(self.inner.sample(inner_params, ctx, obs, key=base_key))
            edited, log_prob = self.edit(params.head, obs, action, key=edit_key)
            return jnp.mean(ctx.critic(obs, edited)), log_prob  # online critic, ensemble mean

        keys = jax.random.split(key, batch.batch_size)
        q_values, log_probs = jax.vmap(example)(batch.observations, keys)
        alpha = params.head.log_alpha()
        target_entropy = -self.target_entropy_multiplier * ctx.action_dim
        loss, metrics = edit_objective(q_values, log_probs, alpha, target_entropy)
        return loss, {
            "head_loss": loss,
            **metrics,
            "edit_q": jnp.mean(q_values),
            "edit_entropy": -jnp.mean(log_probs),
            "edit_alpha": alpha,
        }

    def head_sample(
        self, params: HeadParams, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        """clip(a + β·e, −1, 1): a from the inner, then one stochastic edit."""
        base_key, edit_key = jax.random.split(key)
        action = self.inner.sample(params.inner, ctx, obs, key=base_key)
        return self.edit(params.head, obs, action, key=edit_key)[0]
