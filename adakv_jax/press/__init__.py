"""KV-cache compression ("presses"): scorer x allocation x schedule x budget x granularity
(ADAKV_SPEC sections 3 and 8)."""

from adakv_jax.press.allocation import allocate
from adakv_jax.press.press import PRESETS, Press, make_press, press_label, retained_mass, select
from adakv_jax.press.scorers import SCORERS

__all__ = ["PRESETS", "Press", "SCORERS", "allocate", "make_press", "press_label", "retained_mass", "select"]
