"""flash-attn's ``layers`` package: ``rotary``."""
