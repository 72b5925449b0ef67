"""extensions-builtin/xyz/scripts/xyz_grid.py (Classic @ 1f95d717), as far as extensions see it: the
module webui loads as "xyz_grid.py", whose `axis_options` is lib_xyz's `builtin_options` and whose
`AxisOption` is imported from lib_xyz.classes. No boolean_choice, no format_remove_path here."""

from lib_xyz import builtins
from lib_xyz.classes import AxisOption  # noqa: F401

axis_options = builtins.builtin_options
