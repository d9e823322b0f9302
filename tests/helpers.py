"""Small shared builders for tests: tiny contexts and batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flowrl.batch import Batch
from flowrl.extractor import Context
from flowrl.networks import CriticEnsemble, VelocityField

OBS_DIM = 3
HORIZON = 2
ACTION_DIM = 2  # per step; chunked D = 4
CHUNK_DIM = HORIZON * ACTION_DIM
HIDDEN = (16, 16)


def tiny_context(key) -> Context:
    flow_key, target_flow_key, critic_key, target_critic_key = jax.random.split(key, 4)
    return Context(
        behavior_flow=VelocityField(OBS_DIM, CHUNK_DIM, HIDDEN, key=flow_key),
        target_behavior_flow=VelocityField(OBS_DIM, CHUNK_DIM, HIDDEN, key=target_flow_key),
        critic=CriticEnsemble(OBS_DIM, CHUNK_DIM, HIDDEN, 3, key=critic_key),
        target_critic=CriticEnsemble(OBS_DIM, CHUNK_DIM, HIDDEN, 3, key=target_critic_key),
        obs_dim=OBS_DIM,
        action_dim=CHUNK_DIM,
    )


def tiny_batch(key, batch_size: int = 8) -> Batch:
    keys = jax.random.split(key, 4)
    return Batch(
        observations=jax.random.normal(keys[0], (batch_size, OBS_DIM)),
        actions=jax.random.uniform(keys[1], (batch_size, HORIZON, ACTION_DIM), minval=-1.0, maxval=1.0),
        rewards=-jnp.ones((batch_size,)),
        masks=jnp.ones((batch_size,)),
        next_observations=jax.random.normal(keys[2], (batch_size, OBS_DIM)),
        valid=(jax.random.uniform(keys[3], (batch_size,)) > 0.2).astype(jnp.float32),
    )
