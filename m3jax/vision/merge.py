"""Image / video features into the text model's input embeddings, exactly as transformers' MiniMaxM3VLModel.

transformers: `inputs_embeds.masked_scatter(input_ids == image_token_id, image_features)`, then the same for
videos: the k-th placeholder (row-major over [batch, seq]) takes the k-th feature row, and the placeholder
count must equal the feature count. Placeholder positions stay ordinary 1D positions.
`M3ForCausalLM(input_ids, pixel_values=..., ...)` and `M3ForCausalLM(inputs_embeds=...)` use these.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from m3jax.vision.model import VisionModel


def placeholder_positions(input_ids, token_id: int) -> np.ndarray:
    """Flat indices (row-major over [B, S]) of the placeholder tokens; host-side."""
    return np.flatnonzero(np.asarray(input_ids).reshape(-1) == token_id)


def scatter_features(embeds_bse, input_ids, features_ne, token_id: int, *, what: str = "image",
                     request: str = "request"):
    """embeds [B, S, E] with the rows at `input_ids == token_id` replaced, in order, by features [n, E].

    Raises ValueError naming `request` when the placeholder count differs from the feature count, or when the
    feature width is not the text hidden size.
    """
    idx = placeholder_positions(input_ids, token_id)
    n = int(np.shape(features_ne)[0])
    if idx.size != n:
        raise ValueError(f"{request}: {what} features and {what} tokens do not match: {idx.size} placeholder "
                         f"tokens (id {token_id}) in input_ids, {n} {what} feature rows")
    e = embeds_bse.shape[-1]
    if np.shape(features_ne)[-1] != e:
        raise ValueError(f"{request}: {what} features have width {np.shape(features_ne)[-1]}, the text hidden "
                         f"size is {e}")
    if n == 0:
        return embeds_bse
    flat = embeds_bse.reshape(-1, e).at[jnp.asarray(idx)].set(jnp.asarray(features_ne).astype(embeds_bse.dtype))
    return flat.reshape(embeds_bse.shape)


def embed_with_vision(model, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                      video_grid_thw=None, *, vision: VisionModel, request: str = "request"):
    """The text model's input embeddings [B, S, E] with image then video features scattered in.

    `model` is an M3ForCausalLM (its `embed`); `vision` the VisionModel holding the tower and projector.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"{request}: input_ids must be int [batch, seq], got shape {input_ids.shape}")
    cfg = vision.config
    h = model.embed(jnp.asarray(input_ids, jnp.int32))
    for what, pv, grid, token_id in (("image", pixel_values, image_grid_thw, cfg.image_token_index),
                                     ("video", pixel_values_videos, video_grid_thw, cfg.video_token_index)):
        if pv is None:
            if placeholder_positions(input_ids, token_id).size:
                raise ValueError(f"{request}: input_ids hold {what} placeholder tokens (id {token_id}) but no "
                                 f"{what} pixel values were given")
            continue
        if grid is None:
            raise ValueError(f"{request}: {what} pixel values were given without their grid_thw")
        h = scatter_features(h, input_ids, vision(np.asarray(pv), np.asarray(grid)), token_id, what=what,
                             request=request)
    return h
