"""Personalization Guidance as a ComfyUI custom node.

The same repository is a webui/Forge/reForge extension (scripts/, loaded by
webui, which never imports this file) and a ComfyUI custom node: ComfyUI's
nodes.load_custom_node imports this file as a package, under a name made from
its path, after ComfyUI's own `comfy` and `folder_paths` are imported, and
reads NODE_CLASS_MAPPINGS. The nodes live in lib_pg/hosts/comfyui.

The core imports itself as `lib_pg`, so the repository folder is *appended*
to sys.path (never prepended: the repository's tests/ and bench/ must not
shadow ComfyUI's own top-level packages). pytest also imports this file when it
collects tests/ (the repository root is then a package); outside ComfyUI it
defines no nodes and imports nothing.
"""

import os
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}


def _loaded_by_comfyui() -> bool:
    return "comfy" in sys.modules and "folder_paths" in sys.modules


if _loaded_by_comfyui():
    _ROOT = os.path.dirname(os.path.abspath(__file__))
    if _ROOT not in sys.path:
        sys.path.append(_ROOT)
    from lib_pg.hosts.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402,F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
