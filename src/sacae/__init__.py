"""sacae: SAC+AE (Yarats et al. 2019) for the DeepMind Control Suite, from pixels or states."""

__version__ = "0.1.0"
