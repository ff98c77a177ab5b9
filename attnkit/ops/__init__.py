"""Operators: one public function per file, all routed through the torch.library custom ops in ``_library``."""
