# modules_forge/forge_version.py (Classic @ 1f95d717); PG does not read it (a version string).
version = "classic"
