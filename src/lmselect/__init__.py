"""lmselect: choose what a language model is pretrained on (BLISS, BLADE, RHO-1, MATES, random; LoRDO)."""

__version__ = "0.1.0"
