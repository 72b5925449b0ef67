"""The direction of dependency: scripts/ → lib_pg/hosts/<host> → lib_pg core.

Checked on the source (static imports, lazy ones inside functions included),
so a host import cannot creep into the core or into another host's folder."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "lib_pg")
HOST_PACKAGES = {"modules", "backend", "ldm_patched", "modules_forge", "gradio",
                 "comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "nodes", "node_helpers"}


def imported_top_names(path):
    """Every module a file imports (absolute names), at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def python_files(folder):
    for parent, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(parent, name)


def core_files():
    hosts = os.path.join(LIB, "hosts")
    return [path for path in python_files(LIB) if not path.startswith(hosts + os.sep)]


@pytest.mark.parametrize("path", core_files(), ids=lambda path: os.path.relpath(path, ROOT))
def test_the_core_imports_no_host(path):
    names = imported_top_names(path)
    assert not {name for name in names if name.split(".")[0] in HOST_PACKAGES}
    assert not {name for name in names if name.startswith("lib_pg.hosts")}


# What each host folder may import besides the core: its host's packages and
# the front end every host shares (`modules`); never another host's folder.
ALLOWED = {
    "common": ({"modules"}, set()),
    "webui": ({"modules"}, {"forge", "reforge", "neo", "comfyui"}),
    "forge": ({"modules", "backend"}, {"webui", "reforge", "neo", "comfyui"}),
    "reforge": ({"modules", "ldm_patched", "modules_forge"}, {"webui", "forge", "neo", "comfyui"}),
    "neo": ({"modules", "backend"}, {"webui", "forge", "reforge", "comfyui"}),
    # ComfyUI has no webui front end: not even the shared `common` folder (it imports webui's modules).
    "comfyui": ({"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "nodes", "node_helpers"},
                {"webui", "forge", "reforge", "neo", "common"}),
}


@pytest.mark.parametrize("host", sorted(ALLOWED))
def test_a_host_folder_imports_its_host_and_the_shared_code_only(host):
    packages, other_hosts = ALLOWED[host]
    for path in python_files(os.path.join(LIB, "hosts", host)):
        for name in imported_top_names(path):
            top = name.split(".")[0]
            if top in HOST_PACKAGES:
                assert top in packages, f"{os.path.relpath(path, ROOT)} imports {name}"
            parts = name.split(".")
            if parts[:2] == ["lib_pg", "hosts"] and len(parts) > 2:
                assert parts[2] not in other_hosts, f"{os.path.relpath(path, ROOT)} imports {name}"


def test_the_root_init_is_comfyuis_entry_and_imports_no_webui():
    """ComfyUI imports the repository's __init__.py; webui never does. It may import
    only the ComfyUI host folder, and no webui-family host package at all."""
    names = imported_top_names(os.path.join(ROOT, "__init__.py"))
    assert not {name for name in names if name.split(".")[0] in HOST_PACKAGES}
    hosts = {name.split(".")[2] for name in names if name.startswith("lib_pg.hosts.")}
    assert hosts <= {"comfyui"}
