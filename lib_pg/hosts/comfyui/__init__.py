"""PG as a ComfyUI custom node (ComfyUI v0.3.64, Comfy-Org/ComfyUI @ a125cd84).

The repository's root __init__.py imports `nodes` from here when ComfyUI loads
it; nothing else in the repository imports this folder. It may import
ComfyUI's own modules (`comfy`, `folder_paths`, `comfy_extras`, `nodes`) and
the host-free core, never another host's folder.
"""
