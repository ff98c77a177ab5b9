"""Built-in attnkit backends (installed as ``attnkit.backends``); one sub-package per backend."""
