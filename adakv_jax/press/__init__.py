"""KV-cache compression ("presses"): scorer x allocation x schedule x budget (ADAKV_SPEC section 3)."""

from adakv_jax.press.allocation import allocate
from adakv_jax.press.press import PRESETS, Press, compress_layer, make_press
from adakv_jax.press.scorers import SCORERS

__all__ = ["PRESETS", "Press", "SCORERS", "allocate", "compress_layer", "make_press"]
