"""Mirrors folder_paths.py @ a125cd84: get_filename_list, get_full_path_or_raise (FILES: folder -> name -> path)."""

FILES = {"checkpoints": {}}


def get_filename_list(folder_name):
    return sorted(FILES.get(folder_name, {}))


def get_full_path_or_raise(folder_name, filename):
    try:
        return FILES[folder_name][filename]
    except KeyError:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.") from None

models_dir = "/fake-comfyui/models"  # folder_paths.models_dir: the tests point it at a temporary folder
