"""Drop-in replacements for other attention libraries' APIs, running on attnkit (``attnkit.compat.flash_attn``)."""
