"""Integrations with other libraries (``attnkit.integrations.transformers``); each imports its library lazily."""
