"""modules_forge/packages/huggingface_guess (Neo 2.26): on sys.path as `huggingface_guess`
(modules_forge/initialization.py:27 inserts modules_forge/packages)."""
