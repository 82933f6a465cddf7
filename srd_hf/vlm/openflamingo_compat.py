"""Makes open_flamingo 2.0.1 (written for transformers 4.28) run under transformers 5.

Three incompatibilities, each fixed here and nowhere else:

1. Some decoder layers are called with positional arguments (GPT-2 passes the
   cache and masks positionally); open_flamingo's ``FlamingoLayer.forward`` only
   accepts keywords after the hidden states.
2. ``generate`` no longer passes an all-ones ``attention_mask`` to ``forward``,
   which open_flamingo's ``FlamingoLMMixin.forward`` requires as an argument.
3. ``past_key_values`` is being renamed (``cache`` in recent releases); the name
   the wrapped language model accepts is looked up from its signature.

Sizes of the cross-attention blocks are configurable as well: open_flamingo
hard-codes 8 heads of 64 dims and a 4x feed-forward, which dwarfs a tiny model.
"""

from __future__ import annotations

import inspect

from open_flamingo.src.flamingo_lm import FlamingoLayer, FlamingoLMMixin
from open_flamingo.src.helpers import GatedCrossAttentionBlock
from open_flamingo.src.utils import extend_instance
from torch import nn

_CACHE_NAMES = ("cache", "past_key_values")


class CompatFlamingoLayer(FlamingoLayer):
    """A FlamingoLayer that forwards positional arguments to the decoder layer."""

    def forward(self, lang_x, *args, attention_mask=None, **decoder_layer_kwargs):
        if self.gated_cross_attn_layer is not None:
            if self.vis_x is None or self.media_locations is None:
                raise ValueError("the Flamingo layer must be conditioned on images before forward()")
            lang_x = self.gated_cross_attn_layer(
                lang_x, self.vis_x, media_locations=self.media_locations, use_cached_media=self.use_cached_media
            )
        return self.decoder_layer(lang_x, *args, attention_mask=attention_mask, **decoder_layer_kwargs)


class CompatFlamingoLMMixin(FlamingoLMMixin):
    """FlamingoLMMixin with sized cross-attention and the transformers 5 calling conventions."""

    # set by :func:`make_flamingo_lm` before Flamingo.__init__ calls init_flamingo
    cross_attn_kwargs: dict = {}

    def init_flamingo(self, media_token_id, lang_hidden_size, vis_hidden_size, cross_attn_every_n_layers, gradient_checkpointing):
        self.old_decoder_blocks = self._get_decoder_layers()
        self.gated_cross_attn_layers = nn.ModuleList(
            [
                GatedCrossAttentionBlock(dim=lang_hidden_size, dim_visual=vis_hidden_size, **self.cross_attn_kwargs)
                if (layer_idx + 1) % cross_attn_every_n_layers == 0
                else None
                for layer_idx, _ in enumerate(self.old_decoder_blocks)
            ]
        )
        self.init_flamingo_layers(gradient_checkpointing)
        self.media_token_id = media_token_id
        self.initialized_flamingo = True
        self._use_cached_vision_x = False

    def init_flamingo_layers(self, gradient_checkpointing):
        self._set_decoder_layers(
            nn.ModuleList(
                CompatFlamingoLayer(xattn, block, gradient_checkpointing)
                for xattn, block in zip(self.gated_cross_attn_layers, self.old_decoder_blocks)
            )
        )

    def forward(self, input_ids=None, attention_mask=None, **kwargs):  # attention_mask: optional now
        if not getattr(self, "initialized_flamingo", False):
            raise ValueError("Flamingo layers are not initialized; call init_flamingo first")
        if input_ids is None:
            raise ValueError("the Flamingo language model needs input_ids to locate <image> tokens")
        # generate() omits an all-ones mask; None is what the wrapped model expects then (a
        # made-up mask of the new tokens' length would hide the cached prefix)
        for old, new in (("past_key_values", self._cache_argument), ("cache", self._cache_argument)):
            if old != new and old in kwargs:
                kwargs[new] = kwargs.pop(old)
        media_locations = input_ids == self.media_token_id
        # While decoding, new tokens attend to the image cached at prefill.
        use_cached = self._use_cached_vision_x and self.is_conditioned() and not media_locations.any()
        for layer in self._get_decoder_layers():
            if not use_cached:
                layer.condition_media_locations(media_locations)
            layer.condition_use_cached_media(use_cached)
        return super(FlamingoLMMixin, self).forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @property
    def _cache_argument(self) -> str:
        params = inspect.signature(super(FlamingoLMMixin, self).forward).parameters
        return next((name for name in _CACHE_NAMES if name in params), "past_key_values")


def make_flamingo_lm(lang_encoder: nn.Module, decoder_layers_attr_name: str, cross_attn_kwargs: dict | None = None) -> nn.Module:
    """Turn a causal LM into a Flamingo LM in place (open_flamingo's ``extend_instance`` way)."""
    extend_instance(lang_encoder, CompatFlamingoLMMixin)
    lang_encoder.cross_attn_kwargs = dict(cross_attn_kwargs or {})
    lang_encoder.set_decoder_layers_attr_name(decoder_layers_attr_name)
    return lang_encoder
