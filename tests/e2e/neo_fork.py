"""How the e2e suites start Forge Neo (test_neo_e2e.py for SD 1.5, test_neo_sdxl_e2e.py for SDXL).

Neo starts with `--cpu` (no `--always-cpu`) and has no `--ckpt` or `--no-download-sd-model`: the active
checkpoint is set in a settings file of this run's own (`--ui-settings-file`), which also carries Neo's
"VERSION_UID" (without it Neo waits for Enter at start-up).
"""

import json
import os
import re

from . import fork_e2e


class NeoFork(fork_e2e.Fork):
    def launch_args(self, checkpoint_path, port):
        settings = os.path.join(self.path, "pg-e2e-neo-settings.json")  # this run's own; rewritten by the next
        with open(settings, "w") as f:
            json.dump({"VERSION_UID": version_uid(self.path), "sd_model_checkpoint": os.path.basename(checkpoint_path),
                       "live_previews_enable": False}, f)
        flags = [flag for flag in fork_e2e.FLAGS if flag not in ("--always-cpu", "--no-download-sd-model")]
        return [*flags, "--cpu", "--server-name", "127.0.0.1", "--port", str(port), "--ui-settings-file", settings]


def version_uid(path):
    """Neo's settings version (modules/launch_utils.py VERSION_UID): a settings file without it makes
    Neo ask for Enter at start-up."""
    with open(os.path.join(path, "modules", "launch_utils.py"), encoding="utf-8") as f:
        found = re.search(r'VERSION_UID\s*(?::\s*\w+\[?\w*\]?)?\s*=\s*"([^"]+)"', f.read())
    return found.group(1) if found else "PY313"


def neo_fork():
    return NeoFork("Forge Neo", "NEO_PATH", "NEO_PYTHON", ("backend", "modules_forge"))
