import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_WEBUI = os.path.join(ROOT, "tests", "fake_webui")
for path in (ROOT, FAKE_WEBUI):
    if path not in sys.path:
        sys.path.insert(0, path)
