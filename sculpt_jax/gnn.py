"""GNN actor-critic over the padded observation graph (layer 2).

AutoSculpt (arXiv 2412.18091, Sec. 3; REFERENCE.md Sec. 4) encodes the network graph with a GATv2
layer whose attention sees an embedding of the edge type, then an actor and a critic read the pooled
embedding. Ours fixes REFERENCE.md 6.3: ONE params tree holds a trainable edge-type embedding shared
by the encoder, the actor and the critic (no separate critic encoder, no frozen tables).

`ActorCritic.__call__(graph, node_mask, edge_mask, action_mask, valid, node_group)` ->
``{"value": f32 [], "mean": f32 [P]}`` (head "paper"), ``{"value", "logits": f32 [N, P]}``
(heads "per_group", "per_filter"; per_group also returns ``"group_logits": f32 [G, P]``) or
``{"value", "mean": f32 [G + 1, P], "log_std": f32 [2, P]}`` (head "mixture": a diagonal Gaussian
over a network-wide row of pattern logits (from the pooled embedding) and one row per segment,
`node_group` then holding each action node's LAYER; one log-std row for the network-wide row and
one shared by the segment rows; the mean's last dense layers start at zero, so every seed's
initial mean is the all-zero proposal). The
per-node `logits` are already masked: invalid patterns and non-action rows hold `NEG_LOGIT`, so
``softmax`` puts exactly zero mass there. The static masks come from `graph.GraphSpec` (the policy
in `agent.make_policy` closes over them); this module does not import `graph` (same layer).
Everything is jittable and vmappable; padding nodes and edges contribute nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

# Finite "minus infinity": exp underflows to exactly 0 in float32, while 0 * NEG_LOGIT stays finite
# (so entropies and gradients never see inf - inf or 0 * inf).
NEG_LOGIT = -1e9

LEGACY_HEADS = ("paper", "per_group", "per_filter")  # the reference's band rule (`agent`)
HEADS = (*LEGACY_HEADS, "mixture")  # "mixture": the budget-exact policy (`bandit`)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x [N, D] over rows where mask [N] is True -> [D] (0 if none)."""
    m = mask.astype(x.dtype)[:, None]
    return jnp.sum(x * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)


def segment_mean(x: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """Mean of rows of x [N, D] per segment; ids outside [0, num_segments) are dropped -> [S, D]."""
    ok = (segment_ids >= 0) & (segment_ids < num_segments)
    ids = jnp.where(ok, segment_ids, num_segments)
    s = jax.ops.segment_sum(x * ok[:, None], ids, num_segments=num_segments + 1)[:-1]
    n = jax.ops.segment_sum(ok.astype(x.dtype), ids, num_segments=num_segments + 1)[:-1]
    return s / jnp.maximum(n, 1.0)[:, None]


def masked_segment_softmax(
    logits: jax.Array, segment_ids: jax.Array, mask: jax.Array, num_segments: int
) -> jax.Array:
    """Softmax of logits [E, H] over edges sharing a receiver, ignoring edges where mask [E] is
    False (they get weight exactly 0); a receiver with no real edge gets no weight at all."""
    logits = jnp.where(mask[:, None], logits, NEG_LOGIT)
    seg_max = jax.ops.segment_max(logits, segment_ids, num_segments=num_segments)
    seg_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(seg_max), seg_max, 0.0))
    w = jnp.exp(logits - seg_max[segment_ids]) * mask[:, None]
    denom = jax.ops.segment_sum(w, segment_ids, num_segments=num_segments)
    return w / jnp.maximum(denom[segment_ids], 1e-30)


class MLP(nn.Module):
    """Dense stack with tanh between layers (none after the last)."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, f in enumerate(self.features):
            x = nn.Dense(f, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                x = jnp.tanh(x)
        return x


class TypedGATv2Layer(nn.Module):
    """One GATv2 layer whose attention and messages see the edge-type embedding.

    e_ij = a . LeakyReLU(W_s h_i + W_d h_j + W_e t_ij) per head (Brody et al. 2022, Eq. 7 with
    edge features), alpha = softmax over the real incoming edges of j, message
    sum_i alpha_ij (V h_i + U t_ij); then h_j <- LN(h_j + O msg_j), h_j <- LN(h_j + MLP(h_j)).

    Args (call): h f32 [N, D], edge_emb f32 [E, De], senders/receivers int32 [E], edge_mask bool
    [E], node_mask bool [N]. Returns f32 [N, D], zero on padding nodes.
    """

    n_heads: int = 4
    head_dim: int = 16

    @nn.compact
    def __call__(self, h, edge_emb, senders, receivers, edge_mask, node_mask):
        n_nodes, width = h.shape
        hd = self.n_heads * self.head_dim
        x_src = nn.Dense(hd, name="w_src")(h)[senders]
        x_dst = nn.Dense(hd, use_bias=False, name="w_dst")(h)[receivers]
        x_edge = nn.Dense(hd, use_bias=False, name="w_edge")(edge_emb)
        z = nn.leaky_relu(x_src + x_dst + x_edge, 0.2).reshape(-1, self.n_heads, self.head_dim)
        attn = self.param(
            "attn", nn.initializers.lecun_normal(), (self.n_heads, self.head_dim), jnp.float32
        )
        logits = jnp.einsum("ehd,hd->eh", z, attn)
        alpha = masked_segment_softmax(logits, receivers, edge_mask, n_nodes)
        values = nn.Dense(hd, name="w_value")(h)[senders]
        values = values + nn.Dense(hd, use_bias=False, name="w_edge_value")(edge_emb)
        values = values.reshape(-1, self.n_heads, self.head_dim) * alpha[..., None]
        msg = jax.ops.segment_sum(values, receivers, num_segments=n_nodes).reshape(n_nodes, hd)
        h = nn.LayerNorm(name="ln_attn")(h + nn.Dense(width, name="w_out")(msg))
        ff = MLP((2 * width, width), name="ffn")(h)
        h = nn.LayerNorm(name="ln_ffn")(h + ff)
        return h * node_mask[:, None].astype(h.dtype)


class ActorCritic(nn.Module):
    """Shared typed-edge GATv2 encoder with an actor head and a critic head.

    Attributes:
      n_patterns: P.
      n_edge_types: size of the trainable edge-type embedding (`graph.n_edge_types(spec)`).
      n_groups: number of action groups G (used by head "per_group").
      head: "paper" (pooled -> Gaussian mean over pattern probabilities, in (0, 1)), "per_group"
        (group logits [G, P]), "per_filter" (node logits [N, P]) or "mixture" (Gaussian mean
        [G + 1, P]: a network-wide row and one per segment, zero at init; learnable log-std [2, P]).
      init_log_std: initial log-std of the "mixture" head's network-wide row and segment rows.
      hidden: node embedding width; n_layers: GATv2 layers; n_heads: attention heads.
      edge_dim: edge-type embedding width; mlp_hidden: width of the head MLPs.
    """

    n_patterns: int
    n_edge_types: int
    n_groups: int = 1
    head: str = "per_group"
    hidden: int = 64
    n_layers: int = 2
    n_heads: int = 4
    edge_dim: int = 32
    mlp_hidden: int = 128
    init_log_std: tuple[float, float] = (0.0, 0.0)

    @nn.compact
    def __call__(
        self,
        graph: jraph.GraphsTuple,
        node_mask: jax.Array,
        edge_mask: jax.Array,
        action_mask: jax.Array,
        valid: jax.Array,
        node_group: jax.Array,
    ) -> dict[str, jax.Array]:
        """Args: graph (nodes {"feat": f32 [N, F]}, edges {"type": int32 [E]}); node_mask bool [N];
        edge_mask bool [E]; action_mask bool [N]; valid bool [N, P]; node_group int32 [N]."""
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        node_mask = jnp.asarray(node_mask, bool)
        edge_mask = jnp.asarray(edge_mask, bool)
        action_mask = jnp.asarray(action_mask, bool) & node_mask
        valid = jnp.asarray(valid, bool) & action_mask[:, None]
        feat = graph.nodes["feat"] * node_mask[:, None]
        edge_embed = nn.Embed(self.n_edge_types, self.edge_dim, name="edge_embed")
        e = edge_embed(graph.edges["type"]) * edge_mask[:, None]

        h = nn.LayerNorm(name="embed_ln")(MLP((self.hidden, self.hidden), name="embed")(feat))
        h = h * node_mask[:, None]
        for i in range(self.n_layers):
            h = TypedGATv2Layer(
                n_heads=self.n_heads, head_dim=max(self.hidden // self.n_heads, 1), name=f"gat_{i}"
            )(h, e, graph.senders, graph.receivers, edge_mask, node_mask)

        pooled = masked_mean(h, node_mask)
        value = MLP((self.mlp_hidden, 1), name="critic")(pooled)[0]
        out = {"value": value}
        p = self.n_patterns
        if self.head == "paper":
            out["mean"] = jax.nn.sigmoid(MLP((self.mlp_hidden, p), name="actor")(pooled))
            return out
        if self.head == "mixture":
            g = segment_mean(h, jnp.where(action_mask, node_group, -1), self.n_groups)
            x = jnp.concatenate([g, jnp.broadcast_to(pooled, g.shape)], -1)
            x = jnp.tanh(MLP((self.mlp_hidden,), name="actor")(x))
            zeros = nn.initializers.zeros
            rows = nn.Dense(p, kernel_init=zeros, bias_init=zeros, name="actor_out")(x)
            shared = jnp.tanh(MLP((self.mlp_hidden,), name="actor_shared")(pooled))
            shared = nn.Dense(p, kernel_init=zeros, bias_init=zeros, name="shared_out")(shared)
            out["mean"] = jnp.concatenate([shared[None], rows], axis=0)
            init = lambda key, shape: jnp.broadcast_to(
                jnp.asarray(self.init_log_std, jnp.float32)[:, None], shape
            )
            out["log_std"] = self.param("log_std", init, (2, p))
            return out
        if self.head == "per_group":
            g = segment_mean(h, jnp.where(action_mask, node_group, -1), self.n_groups)
            ctx = jnp.broadcast_to(pooled, g.shape)
            group_logits = MLP((self.mlp_hidden, p), name="actor")(jnp.concatenate([g, ctx], -1))
            out["group_logits"] = group_logits
            logits = group_logits[jnp.clip(node_group, 0, self.n_groups - 1)]
        else:
            ctx = jnp.broadcast_to(pooled, h.shape)
            logits = MLP((self.mlp_hidden, p), name="actor")(jnp.concatenate([h, ctx], -1))
        out["logits"] = jnp.where(valid, logits, NEG_LOGIT)
        return out
